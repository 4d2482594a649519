/* cli.h - the qwen3d subcommands.  Each takes (argc, argv) with argv[0] the subcommand name and
 * returns the process exit status (0 ok, 1 error, 2 usage).  main.c owns the table. */
#pragma once

int cmd_inspect(int argc, char **argv);    /* cli_inspect.c */
int cmd_logits(int argc, char **argv);     /* cli_logits.c */
int cmd_generate(int argc, char **argv);   /* cli_logits.c */
int cmd_tokenize(int argc, char **argv);   /* cli_tokenize.c */
int cmd_detokenize(int argc, char **argv); /* cli_tokenize.c */
int cmd_render(int argc, char **argv);     /* cli_tokenize.c */
int cmd_start(int argc, char **argv);      /* cli_daemon.c */
int cmd_stop(int argc, char **argv);       /* cli_daemon.c */
int cmd_status(int argc, char **argv);     /* cli_daemon.c */
int cmd_bench(int argc, char **argv);      /* tools/bench.c */
int cmd_mkmodel(int argc, char **argv);    /* tools/mkmodel.c */
