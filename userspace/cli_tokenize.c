/* cli_tokenize.c - `qwen3d tokenize`, `qwen3d detokenize` and `qwen3d render`:
 *   tokenize   [--tokenizer DIR | --model DIR]   text on stdin -> ids on stdout, space separated, one line
 *              --bench FILE [--docs] [--seconds S] [--ids-out F]: encode FILE repeatedly on one thread
 *              and print its speed; --docs: FILE holds documents separated by NUL bytes, one encode
 *              call each; --ids-out: write the ids to F, one line per document (for comparing with
 *              Hugging Face, see tools/bench_tokenize.py)
 *   detokenize [--tokenizer DIR | --model DIR]   ids on stdin (whitespace or comma separated) -> text
 *   render     [--tokenizer DIR | --model DIR]   {"messages", "tools", "add_generation_prompt"} on
 *              stdin -> the prompt text, byte exact (the model folder is only checked, if given)
 * Errors: one line on stderr, exit 1 (2 for a usage error). */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "cli.h"
#include "strbuf.h"
#include "tokenizer.h"
#include "util.h"

struct opts {
	const char *dir, *bench, *ids_out;
	double seconds;
	bool docs;
};

static int usage(const char *cmd)
{
	fprintf(stderr, "usage: qwen3d %s [--tokenizer DIR | --model DIR]%s\n", cmd,
		!strcmp(cmd, "tokenize") ? " [--bench FILE [--docs] [--seconds S] [--ids-out FILE]]" : "");
	return 2;
}

/* Returns -1 to go on, else the exit status. */
static int parse(int argc, char **argv, struct opts *o)
{
	static const struct option lo[] = {
		{ "tokenizer", required_argument, NULL, 't' }, { "model", required_argument, NULL, 'm' },
		{ "bench", required_argument, NULL, 'b' },     { "seconds", required_argument, NULL, 's' },
		{ "ids-out", required_argument, NULL, 'o' },   { "docs", no_argument, NULL, 'd' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	bool tok = !strcmp(argv[0], "tokenize");
	int c;

	memset(o, 0, sizeof(*o));
	o->seconds = 3;
	optind = 1;
	opterr = 0; /* usage() says it, in one line */
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 't':
		case 'm':
			o->dir = optarg;
			break;
		case 'b':
		case 's':
		case 'o':
		case 'd':
			if (!tok)
				return usage(argv[0]);
			if (c == 'd')
				o->docs = true;
			else if (c == 'b')
				o->bench = optarg;
			else if (c == 'o')
				o->ids_out = optarg;
			else if ((o->seconds = atof(optarg)) <= 0)
				return usage(argv[0]);
			break;
		case 'h':
			usage(argv[0]);
			return 0;
		default:
			return usage(argv[0]);
		}
	}
	if (optind != argc)
		return usage(argv[0]);
	return -1;
}

static char *read_stream(FILE *f, size_t *len)
{
	struct q3_sb sb = Q3_SB_INIT;
	char buf[65536];
	size_t n;

	while ((n = fread(buf, 1, sizeof(buf), f)) > 0)
		if (q3_sb_add(&sb, buf, n)) {
			q3_sb_free(&sb);
			return NULL;
		}
	if (ferror(f)) {
		q3_sb_free(&sb);
		return NULL;
	}
	return q3_sb_take(&sb, len);
}

/* Writes text to stdout and frees it; the exit status. */
static int write_out(const char *cmd, char *text, size_t len)
{
	int bad = fwrite(text, 1, len, stdout) != len || fflush(stdout);
	free(text);
	if (bad)
		fprintf(stderr, "qwen3d %s: stdout: write failed\n", cmd);
	return bad;
}

static struct q3_tok *load(const char *cmd, const char *dir)
{
	struct q3_tok *tok;
	q3_err e;

	if (!dir) {
		fprintf(stderr, "qwen3d %s: needs --tokenizer DIR or --model DIR\n", cmd);
		return NULL;
	}
	if (q3_tok_load(dir, &tok, &e)) {
		fprintf(stderr, "qwen3d %s: %s\n", cmd, e.msg);
		return NULL;
	}
	return tok;
}

/* Parses the options, loads the tokenizer and reads stdin (not for --bench): -1 to go on, else
 * the exit status. */
static int start(int argc, char **argv, struct opts *o, struct q3_tok **tok, char **in, size_t *len)
{
	int rc = parse(argc, argv, o);

	if (rc >= 0)
		return rc;
	if (!(*tok = load(argv[0], o->dir)))
		return 1;
	*in = NULL;
	if (!o->bench && !(*in = read_stream(stdin, len))) {
		fprintf(stderr, "qwen3d %s: stdin: read failed\n", argv[0]);
		q3_tok_free(*tok);
		return 1;
	}
	return -1;
}

static int write_ids(FILE *f, const int32_t *ids, size_t n)
{
	for (size_t i = 0; i < n; i++)
		fprintf(f, i ? " %d" : "%d", ids[i]);
	fputc('\n', f);
	return fflush(f) || ferror(f) ? -EIO : 0;
}

/* Encodes the documents of text (the whole text, or with --docs its NUL-separated parts) one
 * call each; *ntok gets the token count, and f (if not NULL) one line of ids per document. */
static int encode_docs(struct q3_tok *tok, const char *text, size_t len, bool docs, FILE *f, size_t *ntok,
		       q3_err *e)
{
	size_t at = 0;

	*ntok = 0;
	do {
		const char *end = docs ? memchr(text + at, 0, len - at) : NULL;
		size_t dl = (end ? (size_t)(end - text) : len) - at, n;
		int32_t *ids;
		int err = q3_tok_encode(tok, text + at, dl, &ids, &n, e);
		if (err)
			return q3_err_prefix(e, err, "document at byte %zu", at);
		*ntok += n;
		err = f ? write_ids(f, ids, n) : 0;
		free(ids);
		if (err)
			return q3_errf(e, err, "write failed");
		at += dl + 1;
	} while (at < len);
	return 0;
}

static int bench(struct q3_tok *tok, const struct opts *o)
{
	char *text;
	size_t len, n = 0, rounds = 0;
	double t0, dt;
	FILE *f;
	q3_err e;

	if (q3_read_file(o->bench, (size_t)1 << 32, &text, &len, &e)) {
		fprintf(stderr, "qwen3d tokenize: %s\n", e.msg);
		return 1;
	}
	t0 = q3_now();
	do {
		if (encode_docs(tok, text, len, o->docs, NULL, &n, &e)) {
			fprintf(stderr, "qwen3d tokenize: %s: %s\n", o->bench, e.msg);
			free(text);
			return 1;
		}
		rounds++;
		dt = q3_now() - t0;
	} while (dt < o->seconds);
	size_t bytes = len; /* the text, without the separators */
	for (size_t i = 0; o->docs && i < len; i++)
		bytes -= !text[i];
	printf("qwen3d tokenize: %zu bytes -> %zu tokens, %zu rounds in %.2f s: %.2f MB/s (one thread)\n", bytes, n,
	       rounds, dt, (double)bytes * (double)rounds / dt / 1e6);
	int rc = 0;
	if (o->ids_out) {
		if (!(f = fopen(o->ids_out, "w"))) {
			fprintf(stderr, "qwen3d tokenize: %s: %s\n", o->ids_out, strerror(errno));
			rc = 1;
		} else if (encode_docs(tok, text, len, o->docs, f, &n, &e) | fclose(f)) {
			fprintf(stderr, "qwen3d tokenize: %s: write failed\n", o->ids_out);
			rc = 1;
		}
	}
	free(text);
	return rc;
}

int cmd_tokenize(int argc, char **argv)
{
	struct opts o;
	struct q3_tok *tok;
	char *text;
	size_t len, n;
	int32_t *ids;
	int rc = start(argc, argv, &o, &tok, &text, &len);
	q3_err e;

	if (rc >= 0)
		return rc;
	if (o.bench) {
		rc = bench(tok, &o);
		q3_tok_free(tok);
		return rc;
	}
	rc = q3_tok_encode(tok, text, len, &ids, &n, &e);
	free(text);
	q3_tok_free(tok);
	if (rc) {
		fprintf(stderr, "qwen3d tokenize: stdin: %s\n", e.msg);
		return 1;
	}
	rc = write_ids(stdout, ids, n);
	free(ids);
	if (rc) {
		fprintf(stderr, "qwen3d tokenize: stdout: write failed\n");
		return 1;
	}
	return 0;
}

/* Ids separated by whitespace and/or commas. */
static int parse_id_text(const char *s, size_t len, int32_t **out, size_t *n, q3_err *e)
{
	size_t cap = 0, i = 0;
	int32_t *ids = NULL;

	*n = 0;
	while (i < len) {
		char c = s[i];
		if (c == ',' || c == ' ' || c == '\t' || c == '\n' || c == '\r') {
			i++;
			continue;
		}
		if (c < '0' || c > '9') {
			free(ids);
			return q3_errf(e, -EINVAL, "byte %zu: expected token ids separated by spaces or commas, found '%c'",
				       i, c >= 32 && c < 127 ? c : '?');
		}
		int64_t v = 0;
		size_t start = i;
		while (i < len && s[i] >= '0' && s[i] <= '9') {
			v = v * 10 + (s[i++] - '0');
			if (v > INT32_MAX) {
				free(ids);
				return q3_errf(e, -EINVAL, "byte %zu: id too large", start);
			}
		}
		if (*n == cap) {
			cap = cap ? 2 * cap : 256;
			int32_t *nb = realloc(ids, cap * sizeof(*ids));
			if (!nb) {
				free(ids);
				return q3_errf(e, -ENOMEM, "out of memory");
			}
			ids = nb;
		}
		ids[(*n)++] = (int32_t)v;
	}
	*out = ids;
	return 0;
}

int cmd_detokenize(int argc, char **argv)
{
	struct opts o;
	struct q3_tok *tok;
	char *in, *text;
	size_t len, n;
	int32_t *ids = NULL;
	int rc = start(argc, argv, &o, &tok, &in, &len);
	q3_err e;

	if (rc >= 0)
		return rc;
	rc = parse_id_text(in, len, &ids, &n, &e);
	free(in);
	if (!rc)
		rc = q3_tok_decode(tok, ids, n, &text, &len, &e);
	free(ids);
	q3_tok_free(tok);
	if (rc) {
		fprintf(stderr, "qwen3d detokenize: stdin: %s\n", e.msg);
		return 1;
	}
	return write_out("detokenize", text, len);
}

int cmd_render(int argc, char **argv)
{
	struct opts o;
	char *in, *text;
	size_t len;
	json_t *req;
	json_error_t je;
	int rc = parse(argc, argv, &o);
	q3_err e;

	if (rc >= 0)
		return rc;
	if (o.dir && (rc = q3_chat_check_template(o.dir, &e))) {
		fprintf(stderr, "qwen3d render: %s%s\n", rc > 0 ? "warning: " : "", e.msg);
		if (rc < 0)
			return 1;
	}
	if (!(in = read_stream(stdin, &len))) {
		fprintf(stderr, "qwen3d render: stdin: read failed\n");
		return 1;
	}
	req = json_loadb(in, len, 0, &je);
	free(in);
	if (!req) {
		fprintf(stderr, "qwen3d render: stdin: line %d column %d: %s\n", je.line, je.column, je.text);
		return 1;
	}
	rc = q3_chat_render(req, &text, &len, &e);
	json_decref(req);
	if (rc) {
		fprintf(stderr, "qwen3d render: %s\n", e.msg);
		return 1;
	}
	return write_out("render", text, len);
}
