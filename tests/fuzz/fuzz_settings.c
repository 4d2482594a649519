/* fuzz_settings.c - libFuzzer target for the daemon's settings: the config file, the qwen3mm
 * knob values and the command-line flags, resolved together (settings.h).  The input is three
 * parts separated by NUL bytes: the config file's bytes, knob lines "name=value", and flags (one
 * per line).  Refusals are fine; a crash, a leak, or a value outside its declared bounds is not. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "settings.h"

static const char *knobs; /* "name=value\n..." */
static size_t knobs_len;

static int fuzz_knob(void *ctx, const char *name, char *buf, size_t n, char *origin, size_t on)
{
	size_t nl = strlen(name);

	for (const char *p = knobs, *end = knobs + knobs_len; p < end;) {
		const char *eol = memchr(p, '\n', (size_t)(end - p));
		size_t len = eol ? (size_t)(eol - p) : (size_t)(end - p);

		if (len > nl && !memcmp(p, name, nl) && p[nl] == '=') {
			snprintf(buf, n, "%.*s", (int)(len - nl - 1), p + nl + 1);
			snprintf(origin, on, "knob fuzz/%s", name);
			return 0;
		}
		p += len + 1;
	}
	return -2; /* -ENOENT: not set */
}

/* the next NUL-separated part of [*p, end) */
static const uint8_t *part(const uint8_t **p, const uint8_t *end, size_t *len)
{
	const uint8_t *s = *p, *z = s < end ? memchr(s, 0, (size_t)(end - s)) : NULL;

	*len = z ? (size_t)(z - s) : (size_t)(end - s);
	*p = z ? z + 1 : end;
	return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *p = data, *end = data + size, *cfg, *fl;
	size_t cfg_len, fl_len;
	char path[64], *argv[64], *flags;
	int argc = 0, fd;
	struct q3_set_flags f = { 0 };
	struct q3_settings s;
	q3_err e;

	cfg = part(&p, end, &cfg_len);
	knobs = (const char *)part(&p, end, &knobs_len);
	fl = part(&p, end, &fl_len);

	/* the config file: an anonymous file named through /proc (settings read paths) */
	if ((fd = memfd_create("config.json", 0)) < 0)
		return 0;
	if (write(fd, cfg, cfg_len) != (ssize_t)cfg_len) {
		close(fd);
		return 0;
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	f.config = path;

	if (!(flags = strndup((const char *)fl, fl_len))) {
		close(fd);
		return 0;
	}
	argv[argc++] = "start";
	for (char *save = NULL, *t = strtok_r(flags, "\n", &save); t && argc < 63; t = strtok_r(NULL, "\n", &save))
		argv[argc++] = t;
	argv[argc] = NULL;
	for (int i = 1; i < argc;) {
		int r = q3_settings_flag(&f, argc, argv, &i, &e);

		if (r <= 0) /* not a setting, or a flag without its value */
			break;
	}
	if (!q3_settings_load(&s, &f, fuzz_knob, NULL, &e)) {
		for (int id = 0; id < Q3_SET_COUNT; id++) {
			const struct q3_set_def *d = &q3_set_defs[id];

			if (!s.v[id].str)
				abort();
			if ((d->type == Q3_SET_INT || d->type == Q3_SET_SIZE) && *s.v[id].str &&
			    (s.v[id].num < d->min || s.v[id].num > d->max))
				abort();
		}
		free(q3_settings_json(&s));
		q3_settings_free(&s);
	} else if (!e.msg[0]) {
		abort(); /* a refusal always says why */
	}
	free(flags);
	close(fd);
	return 0;
}
