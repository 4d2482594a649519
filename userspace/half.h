/* half.h - bf16 / fp16 <-> fp32 conversions, exact (round to nearest even on the way down). */
#pragma once
#include <stdint.h>
#include <string.h>

static inline float q3_bits_f32(uint32_t u)
{
	float f;
	memcpy(&f, &u, 4);
	return f;
}

static inline uint32_t q3_f32_bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	return u;
}

static inline float q3_bf16_to_f32(uint16_t h)
{
	return q3_bits_f32((uint32_t)h << 16);
}

static inline uint16_t q3_f32_to_bf16(float f)
{
	uint32_t u = q3_f32_bits(f);
	if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet */
		return (uint16_t)((u >> 16) | 0x40);
	u += 0x7fffu + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

static inline float q3_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t exp = (h >> 10) & 0x1f;
	uint32_t man = h & 0x3ff;
	if (exp == 0) {
		/* zero or subnormal: value = man * 2^-24 */
		float f = (float)man * (1.0f / 16777216.0f);
		return sign ? -f : f;
	}
	if (exp == 31)
		return q3_bits_f32(sign | 0x7f800000u | (man << 13));
	return q3_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

static inline uint16_t q3_f32_to_f16(float f)
{
	uint32_t u = q3_f32_bits(f);
	uint32_t sign = (u >> 16) & 0x8000;
	uint32_t a = u & 0x7fffffffu;
	if (a > 0x7f800000u)
		return (uint16_t)(sign | 0x7e00);
	if (a >= 0x477ff000u) /* rounds to >= 65520: inf */
		return (uint16_t)(sign | 0x7c00);
	if (a < 0x38800000u) { /* below the smallest normal: subnormal or zero */
		float v = q3_bits_f32(a) * 16777216.0f; /* in units of 2^-24 */
		uint32_t m = (uint32_t)v;
		float r = v - (float)m;
		if (r > 0.5f || (r == 0.5f && (m & 1)))
			m++;
		return (uint16_t)(sign | m);
	}
	uint32_t e = (a >> 23) - 112, m = a & 0x7fffff;
	uint32_t h = (e << 10) | (m >> 13);
	uint32_t rest = m & 0x1fff;
	if (rest > 0x1000 || (rest == 0x1000 && (h & 1)))
		h++;
	return (uint16_t)(sign | h);
}
