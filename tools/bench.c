/* bench.c - `qwen3d bench`: dispatches to the benchmarks (decode, prefill and suite live in
 * bench_run.c, experts in bench_experts.c, offload in bench_offload.c). */
#include <stdio.h>
#include <string.h>

#include "cli.h"

int q3_bench_decode(int argc, char **argv);  /* bench_run.c */
int q3_bench_prefill(int argc, char **argv); /* bench_run.c */
int q3_bench_suite(int argc, char **argv);   /* bench_run.c */
int cmd_bench_experts(int argc, char **argv); /* bench_experts.c */
int cmd_bench_offload(int argc, char **argv); /* bench_offload.c */

int cmd_bench(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "decode"))
		return q3_bench_decode(argc - 1, argv + 1);
	if (argc > 1 && !strcmp(argv[1], "prefill"))
		return q3_bench_prefill(argc - 1, argv + 1);
	if (argc > 1 && !strcmp(argv[1], "suite"))
		return q3_bench_suite(argc - 1, argv + 1);
	if (argc > 1 && !strcmp(argv[1], "experts"))
		return cmd_bench_experts(argc - 1, argv + 1);
	if (argc > 1 && !strcmp(argv[1], "offload"))
		return cmd_bench_offload(argc - 1, argv + 1);
	fprintf(stderr, "qwen3d %s %s: not built yet (decode, prefill, suite, experts and offload are)\n", argv[0],
		argc > 1 ? argv[1] : "");
	return 1;
}
