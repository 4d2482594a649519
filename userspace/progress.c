/* progress.c - a byte-count progress line on a terminal (see progress.h). */
#include "progress.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

#define DRAW_PERIOD 0.2
#define BAR_WIDTH 20

void q3_progress_begin(struct q3_progress *p, const char *what, uint64_t total, bool enabled)
{
	memset(p, 0, sizeof(*p));
	p->what = what;
	p->total = total;
	p->t0 = q3_now();
	p->next_draw = p->t0 + DRAW_PERIOD;
	p->tty = enabled && isatty(STDERR_FILENO);
}

static void draw(struct q3_progress *p, uint64_t done, double now)
{
	double dt = now - p->t0, rate = dt > 0 ? (double)done / dt : 0;
	double frac = p->total ? (double)done / (double)p->total : 0;
	char bar[BAR_WIDTH + 1], eta[32] = "";
	int fill = (int)(frac * BAR_WIDTH);

	if (frac > 1)
		frac = 1, fill = BAR_WIDTH;
	memset(bar, '#', (size_t)fill);
	memset(bar + fill, '.', (size_t)(BAR_WIDTH - fill));
	bar[BAR_WIDTH] = 0;
	if (rate > 0 && done < p->total)
		snprintf(eta, sizeof(eta), "  ETA %.0f s", (double)(p->total - done) / rate);
	fprintf(stderr, "\r%-8s %6.1f / %.1f GB  [%s] %3.0f%%  %.2f GB/s%s  %s\033[K", p->what,
		(double)done / 1e9, (double)p->total / 1e9, bar, frac * 100, rate / 1e9, eta, p->extra);
	fflush(stderr);
}

/* Only one thread draws per period: the one whose compare-and-swap moves next_draw forward. */
static void maybe_draw(struct q3_progress *p, uint64_t done)
{
	double now, due;

	if (!p->tty)
		return;
	now = q3_now();
	__atomic_load(&p->next_draw, &due, __ATOMIC_RELAXED);
	if (now < due)
		return;
	if (!__atomic_compare_exchange(&p->next_draw, &due, &(double){ now + DRAW_PERIOD }, false,
				       __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		return;
	draw(p, done, now);
}

void q3_progress_add(struct q3_progress *p, uint64_t n)
{
	maybe_draw(p, __atomic_add_fetch(&p->done, n, __ATOMIC_RELAXED));
}

void q3_progress_set(struct q3_progress *p, uint64_t done)
{
	__atomic_store_n(&p->done, done, __ATOMIC_RELAXED);
	maybe_draw(p, done);
}

void q3_progress_end(struct q3_progress *p)
{
	if (p->tty) {
		fprintf(stderr, "\r\033[K");
		fflush(stderr);
	}
}
