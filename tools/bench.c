/* bench.c - placeholder until its issue lands: every command here says so and fails. */
#include <stdio.h>
#include "cli.h"

int cmd_bench(int argc, char **argv)
{
	fprintf(stderr, "qwen3d %s: not built yet\n", argv[0]);
	return 1;
}
