/* cli_logits.c - `qwen3d logits` (run ids through the model, write the logits) and
 * `qwen3d generate` (greedy continuation of prompt ids).
 *
 *   qwen3d logits --model DIR --prompt-ids 1,2,3 [--feed-ids 4,5,6] --out F.safetensors
 *                 [--backend cpu|cuda|auto] [--threads N]
 * F holds prefill_logits F32 [T, V] (the logits after each prompt position) and, with
 * --feed-ids, decode_logits F32 [G, V] (after feeding each id one at a time on top of the
 * prompt): the meaning of the fixtures' reference.safetensors.
 *
 *   qwen3d generate --model DIR --prompt-ids 1,2,3 [--max-tokens N] [--backend ...] [--threads N]
 * prints the generated ids on one line (greedy; stops at an end-of-sequence id) and the prefill
 * and decode speeds on stderr.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "chat.h"
#include "cli.h"
#include "engine.h"
#include "tokenizer.h"
#include "safetensors.h"

struct run_opts {
	const char *model, *prompt_ids, *feed_ids, *out, *backend, *prompt;
	int threads, max_tokens;
	uint64_t vram_budget;
};

enum { OPT_MODEL = 1, OPT_PROMPT_IDS, OPT_FEED_IDS, OPT_OUT, OPT_BACKEND, OPT_THREADS,
       OPT_MAX_TOKENS, OPT_PROMPT, OPT_VRAM_BUDGET, OPT_HELP };

static const struct option long_opts[] = {
	{ "model", required_argument, NULL, OPT_MODEL },
	{ "prompt-ids", required_argument, NULL, OPT_PROMPT_IDS },
	{ "feed-ids", required_argument, NULL, OPT_FEED_IDS },
	{ "out", required_argument, NULL, OPT_OUT },
	{ "backend", required_argument, NULL, OPT_BACKEND },
	{ "threads", required_argument, NULL, OPT_THREADS },
	{ "max-tokens", required_argument, NULL, OPT_MAX_TOKENS },
	{ "prompt", required_argument, NULL, OPT_PROMPT },
	{ "vram-budget", required_argument, NULL, OPT_VRAM_BUDGET },
	{ "help", no_argument, NULL, OPT_HELP },
	{ 0 },
};

#define VRAM_BUDGET_HELP                                                                             \
	"--vram-budget: VRAM the weights may use, like 20GiB (cuda; the routed experts beyond it are\n" \
	"               computed from RAM); default: what the card has free\n"

static const char logits_usage[] =
	"usage: qwen3d logits --model DIR --prompt-ids 1,2,3 [--feed-ids 4,5,6] --out F.safetensors\n"
	"                     [--backend cpu|cuda|auto] [--threads N] [--vram-budget SIZE]\n" VRAM_BUDGET_HELP;
static const char generate_usage[] =
	"usage: qwen3d generate --model DIR (--prompt-ids 1,2,3 | --prompt TEXT) [--max-tokens N]\n"
	"                       [--backend cpu|cuda|auto] [--threads N] [--vram-budget SIZE]\n" VRAM_BUDGET_HELP;

static int parse_int(const char *cmd, const char *opt, const char *s, int lo, int *out)
{
	char *end;
	long v = strtol(s, &end, 10);

	if (!*s || *end || v < lo || v > 1 << 30) {
		fprintf(stderr, "qwen3d %s: --%s: '%s' is not an integer >= %d\n", cmd, opt, s, lo);
		return -1;
	}
	*out = (int)v;
	return 0;
}

/* Returns 0, or the exit status to leave with (0 for --help, 2 for usage errors). */
static int parse_opts(int argc, char **argv, const char *usage, struct run_opts *o, int *status)
{
	int c;

	*status = 2;
	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", long_opts, NULL)) != -1) {
		switch (c) {
		case OPT_MODEL: o->model = optarg; break;
		case OPT_PROMPT_IDS: o->prompt_ids = optarg; break;
		case OPT_FEED_IDS: o->feed_ids = optarg; break;
		case OPT_OUT: o->out = optarg; break;
		case OPT_BACKEND: o->backend = optarg; break;
		case OPT_PROMPT: o->prompt = optarg; break;
		case OPT_THREADS:
			if (parse_int(argv[0], "threads", optarg, 1, &o->threads))
				return -1;
			break;
		case OPT_VRAM_BUDGET:
			if (q3_parse_size(optarg, &o->vram_budget) || !o->vram_budget) {
				fprintf(stderr, "qwen3d %s: --vram-budget: '%s' is not a size like 20GiB\n", argv[0],
					optarg);
				return -1;
			}
			break;
		case OPT_MAX_TOKENS:
			if (parse_int(argv[0], "max-tokens", optarg, 0, &o->max_tokens))
				return -1;
			break;
		case OPT_HELP:
			fputs(usage, stdout);
			*status = 0;
			return -1;
		default:
			fprintf(stderr, "qwen3d %s: unknown or incomplete option '%s' (see --help)\n", argv[0],
				argv[optind - 1]);
			return -1;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "qwen3d %s: unexpected argument '%s' (see --help)\n", argv[0], argv[optind]);
		return -1;
	}
	return 0;
}

/* Parses an id list; ids are range-checked later against the model's vocabulary. */
static int parse_ids(const char *cmd, const char *what, const char *s, int32_t **ids)
{
	q3_err e = { { 0 } };
	int n = q3_parse_ids(s, 0, ids, &e);

	if (n < 0)
		fprintf(stderr, "qwen3d %s: --%s: %s\n", cmd, what, e.msg);
	return n;
}

static int check_vocab(const char *cmd, const char *what, const int32_t *ids, int n, int V)
{
	for (int i = 0; i < n; i++)
		if (ids[i] >= V) {
			fprintf(stderr, "qwen3d %s: --%s: id %d (item %d) is outside the vocabulary [0, %d)\n",
				cmd, what, ids[i], i, V);
			return -1;
		}
	return 0;
}

static int open_engine(const char *cmd, const struct run_opts *o, int ctx, struct q3_engine **eng,
		       struct q3_session **s)
{
	struct q3_engine_opts eo = {
		.model_dir = o->model,
		.backend = o->backend,
		.threads = o->threads,
		.max_ctx = ctx,
		.max_batch = 1,
		.vram_budget = o->vram_budget,
		.quiet = true,
	};
	q3_err e = { { 0 } };

	if (q3_engine_open(&eo, eng, &e) || q3_session_new(*eng, s, &e)) {
		fprintf(stderr, "qwen3d %s: %s\n", cmd, e.msg);
		q3_engine_close(*eng);
		*eng = NULL;
		return -1;
	}
	return 0;
}

int cmd_logits(int argc, char **argv)
{
	struct run_opts o = { 0 };
	struct q3_engine *eng = NULL;
	struct q3_session *s = NULL;
	int32_t *prompt = NULL, *feed = NULL;
	float *pre = NULL, *dec = NULL;
	int T, G = 0, V, status, rc = 1;
	q3_err e = { { 0 } };

	if (parse_opts(argc, argv, logits_usage, &o, &status))
		return status;
	if (!o.model || !o.prompt_ids || !o.out) {
		fprintf(stderr, "qwen3d logits: --model, --prompt-ids and --out are required (see --help)\n");
		return 2;
	}
	if ((T = parse_ids(argv[0], "prompt-ids", o.prompt_ids, &prompt)) < 0)
		return 1;
	if (o.feed_ids && (G = parse_ids(argv[0], "feed-ids", o.feed_ids, &feed)) < 0)
		goto out;
	if (open_engine(argv[0], &o, T + G, &eng, &s))
		goto out;
	V = q3_engine_config(eng)->vocab_size;
	if (check_vocab(argv[0], "prompt-ids", prompt, T, V) || check_vocab(argv[0], "feed-ids", feed, G, V))
		goto out;
	pre = malloc(sizeof(float) * (size_t)T * V);
	dec = malloc(sizeof(float) * ((size_t)G * V + 1));
	if (!pre || !dec) {
		fprintf(stderr, "qwen3d logits: out of memory\n");
		goto out;
	}
	if (q3_session_eval(s, prompt, T, pre, Q3_EVAL_ALL_LOGITS, &e))
		goto fail;
	for (int i = 0; i < G; i++)
		if (q3_engine_decode(eng, &s, &feed[i], 1, dec + (size_t)i * V, &e))
			goto fail;
	{
		struct q3_st_out t[2] = {
			{ "prefill_logits", Q3_DT_F32, 2, { T, V }, pre },
			{ "decode_logits", Q3_DT_F32, 2, { G, V }, dec },
		};

		if (q3_st_write(o.out, t, G ? 2 : 1, &e))
			goto fail;
	}
	rc = 0;
	goto out;
fail:
	fprintf(stderr, "qwen3d logits: %s\n", e.msg);
out:
	q3_session_free(s);
	q3_engine_close(eng);
	free(prompt);
	free(feed);
	free(pre);
	free(dec);
	return rc;
}

static int argmax(const float *x, int n)
{
	int best = 0;

	for (int i = 1; i < n; i++)
		if (x[i] > x[best])
			best = i;
	return best;
}

static bool is_eos(const struct q3_config *c, int id)
{
	for (int i = 0; i < c->n_eos; i++)
		if (c->eos_ids[i] == id)
			return true;
	return false;
}

/* --prompt: the model folder's tokenizer, and TEXT as one user message in the chat template
 * (with the assistant's turn opened).  The number of ids, or -1 after saying why. */
static int prompt_text(const char *cmd, const char *dir, const char *text, struct q3_tok **tok, int32_t **ids)
{
	json_t *req = json_pack("{s:[{s:s,s:s}]}", "messages", "role", "user", "content", text);
	char *rendered = NULL;
	size_t len, n = 0;
	q3_err e = { { 0 } };
	int rc = -1;

	if (!req) {
		fprintf(stderr, "qwen3d %s: --prompt: not valid UTF-8\n", cmd);
		return -1;
	}
	if (q3_tok_load(dir, tok, &e))
		fprintf(stderr, "qwen3d %s: --prompt needs the model's tokenizer: %s\n", cmd, e.msg);
	else if (q3_chat_render(req, &rendered, &len, &e) || q3_tok_encode(*tok, rendered, len, ids, &n, &e))
		fprintf(stderr, "qwen3d %s: --prompt: %s\n", cmd, e.msg);
	else
		rc = (int)n;
	json_decref(req);
	free(rendered);
	return rc;
}

int cmd_generate(int argc, char **argv)
{
	struct run_opts o = { .max_tokens = 32 };
	struct q3_engine *eng = NULL;
	struct q3_session *s = NULL;
	int32_t *prompt = NULL;
	float *logits = NULL;
	struct q3_tok *tok = NULL;
	struct q3_tok_stream ts = { 0 };
	int T, V, status, rc = 1, made = 0;
	double t0, t1, t2;
	q3_err e = { { 0 } };

	if (parse_opts(argc, argv, generate_usage, &o, &status))
		return status;
	if (!o.model || !o.prompt_ids == !o.prompt) {
		fprintf(stderr, "qwen3d generate: --model and one of --prompt-ids or --prompt are required (see --help)\n");
		return 2;
	}
	if (o.prompt) { /* a user message through the chat template; the answer printed as text */
		if ((T = prompt_text(argv[0], o.model, o.prompt, &tok, &prompt)) < 0)
			goto out;
		if (q3_tok_stream_init(&ts, tok, Q3_TOK_SKIP_SPECIAL, &e)) {
			fprintf(stderr, "qwen3d generate: %s\n", e.msg);
			goto out;
		}
	} else if ((T = parse_ids(argv[0], "prompt-ids", o.prompt_ids, &prompt)) < 0) {
		return 1;
	}
	if (open_engine(argv[0], &o, T + Q3_MAX(o.max_tokens, 1), &eng, &s))
		goto out;
	V = q3_engine_config(eng)->vocab_size;
	if (check_vocab(argv[0], "prompt-ids", prompt, T, V))
		goto out;
	if (!(logits = malloc(sizeof(float) * (size_t)V))) {
		fprintf(stderr, "qwen3d generate: out of memory\n");
		goto out;
	}
	t0 = q3_now();
	if (q3_session_eval(s, prompt, T, logits, 0, &e))
		goto fail;
	t1 = q3_now();
	while (made < o.max_tokens) {
		int32_t id = argmax(logits, V);

		if (tok) {
			const char *text;
			size_t len;

			if (!q3_tok_stream_push(&ts, id, &text, &len, &e))
				fwrite(text, 1, len, stdout);
			fflush(stdout);
		} else {
			printf("%s%d", made ? " " : "", id);
		}
		made++;
		if (is_eos(q3_engine_config(eng), id) || made == o.max_tokens)
			break;
		if (q3_engine_decode(eng, &s, &id, 1, logits, &e))
			goto fail;
	}
	if (tok) {
		const char *text;
		size_t len;

		q3_tok_stream_flush(&ts, &text, &len);
		fwrite(text, 1, len, stdout);
	}
	printf("\n");
	t2 = q3_now();
	q3_info("generate: prefill %d tokens %.3f s (%.1f tok/s), decode %d tokens %.3f s (%.1f tok/s), %s backend",
		T, t1 - t0, T / (t1 - t0), made - 1, t2 - t1, made > 1 ? (made - 1) / (t2 - t1) : 0.0,
		q3_engine_backend(eng));
	rc = 0;
	goto out;
fail:
	fprintf(stderr, "qwen3d generate: %s\n", e.msg);
out:
	q3_session_free(s);
	q3_engine_close(eng);
	if (ts.tok)
		q3_tok_stream_free(&ts);
	q3_tok_free(tok);
	free(prompt);
	free(logits);
	return rc;
}
