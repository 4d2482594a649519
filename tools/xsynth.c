/* xsynth.c - random GPTQ int4 experts in memory (see xsynth.h). */
#include "xsynth.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"

static int tensor(struct q3_tensor *t, const char *name, enum q3_dtype dt, int64_t d0, int64_t d1)
{
	t->name = (char *)name;
	t->dtype = dt;
	t->ndim = d1 ? 2 : 1;
	t->shape[0] = d0;
	t->shape[1] = d1;
	t->nbytes = (uint64_t)d0 * (uint64_t)(d1 ? d1 : 1) * q3_dtype_size(dt);
	t->data = aligned_alloc(64, Q3_ALIGN_UP(t->nbytes, 64));
	t->bound = true;
	return t->data ? 0 : -ENOMEM;
}

static int make_lin(struct q3_xsynth_lin *sl, struct q3_linear *l, const char *what, int K, int N,
		    const struct q3_xsynth_opts *o, uint64_t *rng)
{
	int G = o->G, ng = K / G, err;
	uint32_t *qw, *qz, *gi;
	uint16_t *sc;

	snprintf(sl->name, sizeof(sl->name), "synth.experts.0.%s.qweight", what);
	err = tensor(&sl->qweight, sl->name, Q3_DT_I32, K / 8, N);
	err = err ?: tensor(&sl->qzeros, "qzeros", Q3_DT_I32, ng, N / 8);
	err = err ?: tensor(&sl->scales, "scales", o->bf16 ? Q3_DT_BF16 : Q3_DT_F16, ng, N);
	err = err ?: tensor(&sl->g_idx, "g_idx", Q3_DT_I32, K, 0);
	if (err)
		return err;
	qw = sl->qweight.data;
	qz = sl->qzeros.data;
	sc = sl->scales.data;
	gi = sl->g_idx.data;
	for (size_t i = 0; i < (size_t)K / 8 * (size_t)N; i++)
		qw[i] = (uint32_t)q3_xrand(rng);
	for (size_t i = 0; i < (size_t)ng * (size_t)N / 8; i++) {
		uint32_t w = 0;

		for (int j = 0; j < 8; j++) {
			unsigned z = o->sym ? 8u : (unsigned)(q3_xrand(rng) & 15);

			w |= ((z - (unsigned)o->zero_offset) & 15u) << (4 * j);
		}
		qz[i] = w;
	}
	for (size_t i = 0; i < (size_t)ng * (size_t)N; i++) {
		float s = (float)(0.002 + 0.02 * q3_xrandu(rng));

		sc[i] = o->bf16 ? q3_f32_to_bf16(s) : q3_f32_to_f16(s);
	}
	for (int k = 0; k < K; k++)
		gi[k] = (uint32_t)(k / G);
	if (o->actorder) /* shuffle: input k gets a random group, G inputs per group */
		for (int k = K - 1; k > 0; k--) {
			int j = (int)(q3_xrand(rng) % (uint64_t)(k + 1));
			uint32_t tmp = gi[k];

			gi[k] = gi[j];
			gi[j] = tmp;
		}
	memset(l, 0, sizeof(*l));
	l->fmt = Q3_W_GPTQ;
	l->K = K;
	l->N = N;
	l->qweight = &sl->qweight;
	l->qzeros = &sl->qzeros;
	l->scales = &sl->scales;
	l->g_idx = o->no_gidx ? NULL : &sl->g_idx;
	l->bits = 4;
	l->group_size = G;
	l->ngroups = ng;
	l->zero_offset = o->zero_offset;
	l->sym = o->sym;
	l->desc_act = o->actorder;
	return 0;
}

int q3_xsynth_new(const struct q3_xsynth_opts *o, struct q3_xsynth **out, q3_err *e)
{
	struct q3_xsynth *s;
	uint64_t rng = o->seed;
	int err;

	*out = NULL;
	if (o->H <= 0 || o->I <= 0 || o->G <= 0 || o->H % o->G || o->I % o->G || o->H % 8 ||
	    o->I % 8 || (o->actorder && o->no_gidx))
		return q3_errf(e, -EINVAL, "xsynth: bad shape H %d I %d G %d", o->H, o->I, o->G);
	s = calloc(1, sizeof(*s));
	if (!s)
		return q3_errf(e, -ENOMEM, "out of memory");
	err = make_lin(&s->lin[0], &s->ex.gate, "gate_proj", o->H, o->I, o, &rng);
	err = err ?: make_lin(&s->lin[1], &s->ex.up, "up_proj", o->H, o->I, o, &rng);
	err = err ?: make_lin(&s->lin[2], &s->ex.down, "down_proj", o->I, o->H, o, &rng);
	if (err) {
		q3_xsynth_free(s);
		return q3_errf(e, err, "out of memory");
	}
	*out = s;
	return 0;
}

void q3_xsynth_free(struct q3_xsynth *s)
{
	if (!s)
		return;
	for (int i = 0; i < 3; i++) {
		free(s->lin[i].qweight.data);
		free(s->lin[i].qzeros.data);
		free(s->lin[i].scales.data);
		free(s->lin[i].g_idx.data);
	}
	free(s);
}
