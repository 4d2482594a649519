/* bench.c - placeholder until its issue lands: `qwen3d bench experts` is built (bench_experts.c);
 * every other benchmark says it is not built yet and fails. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

int cmd_bench_experts(int argc, char **argv); /* tools/bench_experts.c */

int cmd_bench(int argc, char **argv)
{
	if (argc >= 2 && !strcmp(argv[1], "experts"))
		return cmd_bench_experts(argc - 1, argv + 1);
	fprintf(stderr, "qwen3d %s: not built yet\n", argv[0]);
	return 1;
}
