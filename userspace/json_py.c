/* json_py.c - Python json.dumps(ensure_ascii=False) formatting (see json_py.h). */
#include "json_py.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int add_string(struct q3_sb *sb, const char *s, size_t n)
{
	size_t run = 0;
	int err = q3_sb_addc(sb, '"');

	for (size_t i = 0; i < n && !err; i++) {
		unsigned char c = (unsigned char)s[i];
		const char *esc = NULL;
		char u[8];
		switch (c) {
		case '"': esc = "\\\""; break;
		case '\\': esc = "\\\\"; break;
		case '\n': esc = "\\n"; break;
		case '\r': esc = "\\r"; break;
		case '\t': esc = "\\t"; break;
		case '\b': esc = "\\b"; break;
		case '\f': esc = "\\f"; break;
		default:
			if (c < 0x20) {
				snprintf(u, sizeof(u), "\\u%04x", c);
				esc = u;
			}
		}
		if (!esc)
			continue;
		err = q3_sb_add(sb, s + run, i - run) ?: q3_sb_adds(sb, esc);
		run = i + 1;
	}
	return err ?: q3_sb_add(sb, s + run, n - run) ?: q3_sb_addc(sb, '"');
}

/* Whether the p-digit mantissa m times 10^(x - p + 1) reads back as a. */
static bool reads_back(unsigned long long m, int x, int p, double a)
{
	char t[48];

	snprintf(t, sizeof(t), "%llue%d", m, x - p + 1);
	return strtod(t, NULL) == a;
}

/* The shortest decimal digits of a > 0 that read back to a (as Python's repr, David Gay's
 * algorithm): *digits without trailing zeros, a = 0.digits... scaled so that the first digit
 * has decimal exponent *exp10.  At each length the correctly rounded digits are tried, then
 * their neighbours: at a power of two the interval that reads back is lopsided, and the
 * nearest p digits may miss it while the next ones up or down hit it. */
static void shortest_digits(double a, char *digits, int *exp10)
{
	char buf[40];
	unsigned long long m = 0, best = 0;
	int x = 0, p, len;

	for (p = 1; p <= 17; p++) {
		snprintf(buf, sizeof(buf), "%.*e", p - 1, a); /* "d.ddde[+-]XX" */
		m = 0;
		for (const char *q = buf; *q && *q != 'e'; q++)
			if (*q >= '0' && *q <= '9')
				m = m * 10 + (unsigned long long)(*q - '0');
		x = atoi(strchr(buf, 'e') + 1);
		if (reads_back(m, x, p, a)) {
			best = m;
			break;
		}
		/* of the neighbours that read back, the one nearer a (both cannot: the interval is
		 * narrower than two steps) */
		if (m > 1 && reads_back(m - 1, x, p, a)) {
			best = m - 1;
			break;
		}
		if (reads_back(m + 1, x, p, a)) {
			best = m + 1;
			break;
		}
	}
	/* m - 1 may have lost a digit (10..0 - 1), m + 1 gained one (99..9 + 1) */
	len = snprintf(buf, sizeof(buf), "%llu", best);
	*exp10 = x + (len - p);
	while (len > 1 && buf[len - 1] == '0')
		len--;
	memcpy(digits, buf, (size_t)len);
	digits[len] = 0;
}

/* Python's float repr: the shortest digits that read back to the same double, fixed
 * notation for decimal exponents -4 < e <= 16 (with ".0" when integral), else d.ddde+XX. */
static int add_real(struct q3_sb *sb, double v)
{
	char digits[24];
	int nd = 0, exp10 = 0;

	if (isnan(v))
		return q3_sb_adds(sb, "NaN");
	if (isinf(v))
		return q3_sb_adds(sb, v < 0 ? "-Infinity" : "Infinity");
	if (v == 0)
		return q3_sb_adds(sb, signbit(v) ? "-0.0" : "0.0");
	shortest_digits(fabs(v), digits, &exp10);
	nd = (int)strlen(digits);

	int decpt = exp10 + 1, err = 0; /* value = 0.digits * 10^decpt */
	if (v < 0)
		err = q3_sb_addc(sb, '-');
	if (decpt > -4 && decpt <= 16) {
		if (decpt <= 0) {
			err = err ?: q3_sb_adds(sb, "0.");
			for (int i = 0; i < -decpt; i++)
				err = err ?: q3_sb_addc(sb, '0');
			err = err ?: q3_sb_adds(sb, digits);
		} else if (decpt >= nd) {
			err = err ?: q3_sb_adds(sb, digits);
			for (int i = nd; i < decpt; i++)
				err = err ?: q3_sb_addc(sb, '0');
			err = err ?: q3_sb_adds(sb, ".0");
		} else {
			err = err ?: q3_sb_add(sb, digits, (size_t)decpt) ?: q3_sb_addc(sb, '.') ?:
				      q3_sb_adds(sb, digits + decpt);
		}
		return err;
	}
	err = err ?: q3_sb_addc(sb, digits[0]);
	if (nd > 1)
		err = err ?: q3_sb_addc(sb, '.') ?: q3_sb_adds(sb, digits + 1);
	return err ?: q3_sb_addf(sb, "e%c%02d", exp10 < 0 ? '-' : '+', abs(exp10));
}

int q3_json_py(struct q3_sb *sb, const json_t *x)
{
	int err = 0;

	switch (json_typeof(x)) {
	case JSON_OBJECT: {
		const char *key;
		json_t *val;
		bool first = true;
		err = q3_sb_addc(sb, '{');
		json_object_foreach((json_t *)x, key, val) {
			size_t klen = json_object_iter_key_len(json_object_key_to_iter(key));
			err = err ?: (first ? 0 : q3_sb_adds(sb, ", ")) ?: add_string(sb, key, klen) ?:
				      q3_sb_adds(sb, ": ") ?: q3_json_py(sb, val);
			first = false;
		}
		return err ?: q3_sb_addc(sb, '}');
	}
	case JSON_ARRAY: {
		size_t i;
		json_t *val;
		err = q3_sb_addc(sb, '[');
		json_array_foreach(x, i, val)
			err = err ?: (i ? q3_sb_adds(sb, ", ") : 0) ?: q3_json_py(sb, val);
		return err ?: q3_sb_addc(sb, ']');
	}
	case JSON_STRING:
		return add_string(sb, json_string_value(x), json_string_length(x));
	case JSON_INTEGER:
		return q3_sb_addf(sb, "%" JSON_INTEGER_FORMAT, json_integer_value(x));
	case JSON_REAL:
		return add_real(sb, json_real_value(x));
	case JSON_TRUE:
		return q3_sb_adds(sb, "true");
	case JSON_FALSE:
		return q3_sb_adds(sb, "false");
	case JSON_NULL:
		return q3_sb_adds(sb, "null");
	}
	return -EINVAL;
}

char *q3_json_py_str(const json_t *x)
{
	struct q3_sb sb = Q3_SB_INIT;

	if (q3_json_py(&sb, x)) {
		q3_sb_free(&sb);
		return NULL;
	}
	return q3_sb_take(&sb, NULL);
}
