/* bench.c - `qwen3d bench`: dispatches to the benchmarks (load in bench_load.c; decode, prefill
 * and suite in bench_run.c; experts in bench_experts.c; offload in bench_offload.c). */
#include <stdio.h>
#include <string.h>

#include "cli.h"

int cmd_bench_load(int argc, char **argv);    /* bench_load.c */
int q3_bench_decode(int argc, char **argv);   /* bench_run.c */
int q3_bench_prefill(int argc, char **argv);  /* bench_run.c */
int q3_bench_suite(int argc, char **argv);    /* bench_run.c */
int cmd_bench_experts(int argc, char **argv); /* bench_experts.c */
int cmd_bench_offload(int argc, char **argv); /* bench_offload.c */

int cmd_bench(int argc, char **argv)
{
	if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		fprintf(argc < 2 ? stderr : stdout,
			"usage: qwen3d bench load|decode|prefill|suite|experts|offload [options]\n");
		return argc < 2 ? 2 : 0;
	}
	if (!strcmp(argv[1], "load"))
		return cmd_bench_load(argc - 1, argv + 1);
	if (!strcmp(argv[1], "decode"))
		return q3_bench_decode(argc - 1, argv + 1);
	if (!strcmp(argv[1], "prefill"))
		return q3_bench_prefill(argc - 1, argv + 1);
	if (!strcmp(argv[1], "suite"))
		return q3_bench_suite(argc - 1, argv + 1);
	if (!strcmp(argv[1], "experts"))
		return cmd_bench_experts(argc - 1, argv + 1);
	if (!strcmp(argv[1], "offload"))
		return cmd_bench_offload(argc - 1, argv + 1);
	fprintf(stderr, "qwen3d bench: unknown benchmark '%s' (load, decode, prefill, suite, experts, offload)\n",
		argv[1]);
	return 2;
}
