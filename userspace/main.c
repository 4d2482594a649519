/* main.c - qwen3d's command-line entry: dispatches to the subcommands of cli.h. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "version.h"

static const struct {
	const char *name;
	int (*fn)(int argc, char **argv);
	const char *help;
} cmds[] = {
	{ "start", cmd_start, "serve the OpenAI-compatible API (daemon; --foreground to stay attached)" },
	{ "stop", cmd_stop, "stop the running daemon (drains in-flight requests)" },
	{ "status", cmd_status, "what the running daemon serves, with what memory and settings" },
	{ "inspect", cmd_inspect, "validate a checkpoint and print its tensor table summary" },
	{ "logits", cmd_logits, "run prompt/feed ids through the model and write logits (safetensors)" },
	{ "generate", cmd_generate, "greedy generation from prompt ids or a chat message (--prompt)" },
	{ "tokenize", cmd_tokenize, "text on stdin -> token ids on stdout" },
	{ "detokenize", cmd_detokenize, "token ids on stdin -> text on stdout" },
	{ "render", cmd_render, "chat request JSON on stdin -> prompt text (chat template)" },
	{ "bench", cmd_bench, "benchmarks: load | decode | prefill | suite | experts | offload" },
	{ "mkmodel", cmd_mkmodel, "write a synthetic checkpoint in the exact hub layout" },
};

static void usage(FILE *f)
{
	fprintf(f, "qwen3d %s - Qwen3-Next-80B-A3B (GPTQ int4) inference on one box\n\n"
		   "usage: qwen3d <command> [options]   (qwen3d <command> --help for its options)\n\n",
		QWEN3D_VERSION);
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		fprintf(f, "  %-11s %s\n", cmds[i].name, cmds[i].help);
}

int main(int argc, char **argv)
{
	if (argc < 2 || !strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		usage(argc < 2 ? stderr : stdout);
		return argc < 2 ? 2 : 0;
	}
	if (!strcmp(argv[1], "version") || !strcmp(argv[1], "--version")) {
		printf("qwen3d %s\n", QWEN3D_VERSION);
		return 0;
	}
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (!strcmp(argv[1], cmds[i].name))
			return cmds[i].fn(argc - 1, argv + 1);
	fprintf(stderr, "qwen3d: unknown command '%s' (qwen3d help lists them)\n", argv[1]);
	return 2;
}
