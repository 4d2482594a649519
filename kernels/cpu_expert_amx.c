/* cpu_expert_amx.c - the CPU expert kernels with AMX-INT8 tiles for batches (built with -mamx-*
 * and the AVX-512 flags; cpu_expert.c calls them only where cpuid says so and Linux granted the
 * tile state, q3_xamx_enable).
 *
 * One token gains nothing from a 16-row tile, so below AMX_MIN_T tokens (and for fp32
 * activations) this table runs the AVX-512 VNNI kernels.  For T tokens, per block of 32 inputs
 * and per half tile of 16 columns:
 *   A (T rows x 32 bytes) = the tokens' int8 activation blocks, gathered into a small buffer;
 *   B (8 rows x 64 bytes) = the block's 4 code rows unpacked to bytes in VNNI order: B row 2i
 *       holds the low nibbles of code row i (inputs 0,2,4,6 of 16 columns, 4 bytes each), row
 *       2i+1 the high nibbles (inputs 1,3,5,7), which is the order of the activation quads;
 *   C (T rows x 16 s32) = tdpbsud(A signed, B unsigned), stored and scaled in fp32 by the
 *       block's scale, exactly as the other variants do with their s32 block sums.
 */
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_expert_impl.h"
#include "cpu_expert_zmm.h"

#define AMX_MIN_T 4
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

bool q3_xamx_enable(void)
{
	return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

struct tilecfg {
	uint8_t palette;
	uint8_t start_row;
	uint8_t reserved[14];
	uint16_t colsb[16];
	uint8_t rows[16];
} __attribute__((packed, aligned(64)));

static void config(int T)
{
	struct tilecfg cfg;

	memset(&cfg, 0, sizeof(cfg));
	cfg.palette = 1;
	for (int i = 0; i < 2; i++) { /* tmm0, tmm1: C of the two column halves */
		cfg.rows[i] = (uint8_t)T;
		cfg.colsb[i] = 64;
	}
	cfg.rows[2] = (uint8_t)T; /* tmm2: A */
	cfg.colsb[2] = Q3_XBLOCK;
	for (int i = 3; i < 5; i++) { /* tmm3, tmm4: B of the two halves */
		cfg.rows[i] = Q3_XBLOCK / 4;
		cfg.colsb[i] = 64;
	}
	_tile_loadconfig(&cfg);
}

static void tile_amx(const struct q3_xmat *m, const struct q3_xact *a, int tile, float *y,
		     size_t ldy)
{
	const uint32_t *cw = m->codes + (size_t)tile * m->cd_tile;
	const uint16_t *sc = m->scales + (size_t)tile * m->sc_tile;
	const uint32_t *zp = m->zeros ? m->zeros + (size_t)tile * m->zp_tile : NULL;
	const int T = a->T, bpg = m->G / Q3_XBLOCK;
	const __m512i m4 = _mm512_set1_epi8(0x0F);
	uint8_t bbuf[2][Q3_XBLOCK / 4][64] __attribute__((aligned(64)));
	int8_t abuf[Q3_XT_MAX][Q3_XBLOCK] __attribute__((aligned(64)));
	int32_t cbuf[2][Q3_XT_MAX][16] __attribute__((aligned(64)));
	__m512 yv[Q3_XT_MAX][2], af[Q3_XT_MAX][2];
	float gz[Q3_XT_MAX];

	for (int t = 0; t < T; t++)
		yv[t][0] = yv[t][1] = _mm512_setzero_ps();
	for (int g = 0; g < m->ngroups; g++) {
		for (int t = 0; t < T; t++) {
			af[t][0] = af[t][1] = _mm512_setzero_ps();
			gz[t] = 0.0f;
		}
		for (int b = g * bpg; b < (g + 1) * bpg; b++) {
			for (int i = 0; i < 4; i++) {
				const uint32_t *w = cw + (size_t)(4 * b + i) * m->cd_row;

				_mm_prefetch((const char *)(w + 16 * m->cd_row), _MM_HINT_T0);
				_mm_prefetch((const char *)(w + 16 * m->cd_row + 16), _MM_HINT_T0);
				for (int c = 0; c < 2; c++) {
					__m512i v = _mm512_loadu_si512(w + 16 * c);

					_mm512_store_si512(bbuf[c][2 * i], _mm512_and_si512(v, m4));
					_mm512_store_si512(bbuf[c][2 * i + 1],
							   _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
				}
			}
			_tile_zero(0);
			_tile_zero(1);
			/* the tokens' blocks, gathered (a call may run on a subset of rows) */
			for (int t = 0; t < T; t++)
				_mm256_store_si256((__m256i *)abuf[t],
						   _mm256_loadu_si256((const __m256i *)(q3_xact_q(a, t) +
											(size_t)b * Q3_XBLOCK)));
			_tile_loadd(2, abuf, Q3_XBLOCK);
			_tile_loadd(3, bbuf[0], 64);
			_tile_loadd(4, bbuf[1], 64);
			_tile_dpbsud(0, 2, 3);
			_tile_dpbsud(1, 2, 4);
			_tile_stored(0, cbuf[0], 64);
			_tile_stored(1, cbuf[1], 64);
			for (int t = 0; t < T; t++) {
				__m512 db = _mm512_set1_ps(q3_xact_d(a, t)[b]);

				gz[t] += q3_xact_bsum(a, t)[b];
				for (int c = 0; c < 2; c++)
					af[t][c] = _mm512_fmadd_ps(
						_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[c][t])), db, af[t][c]);
			}
		}
		for (int c = 0; c < 2; c++) {
			__m512 sv = load_scales(m, sc + (size_t)g * m->sc_grp + 16 * c);
			__m512 zv = load_zeros(m, zp ? zp + (size_t)g * m->zp_grp + 2 * c : NULL);

			for (int t = 0; t < T; t++)
				yv[t][c] = _mm512_fmadd_ps(
					sv, _mm512_fnmadd_ps(zv, _mm512_set1_ps(gz[t]), af[t][c]), yv[t][c]);
		}
	}
	for (int t = 0; t < T; t++)
		for (int c = 0; c < 2; c++)
			_mm512_storeu_ps(y + (size_t)t * ldy + (size_t)tile * Q3_XTILE + (size_t)c * 16,
					 yv[t][c]);
}

static void mat_q8(const struct q3_xmat *m, const struct q3_xact *a, float *y, size_t ldy,
		   int tile0, int tile1)
{
	if (a->T < AMX_MIN_T) {
		q3_xkern_avx512.mat_q8(m, a, y, ldy, tile0, tile1);
		return;
	}
	config(a->T);
	for (int tile = tile0; tile < tile1; tile++)
		tile_amx(m, a, tile, y, ldy);
	_tile_release();
}

static void mat_f32(const struct q3_xmat *m, const struct q3_xact *a, float *y, size_t ldy,
		    int tile0, int tile1)
{
	q3_xkern_avx512.mat_f32(m, a, y, ldy, tile0, tile1);
}

static void act_set(struct q3_xact *a, int t, const float *x, const uint16_t *perm, int b0,
		    int b1)
{
	q3_xkern_avx512.act_set(a, t, x, perm, b0, b1);
}

const struct q3_xkern q3_xkern_amx = {
	.act_set = act_set,
	.mat_q8 = mat_q8,
	.mat_f32 = mat_f32,
};
