/* The packed-P kernels of twa_scale/twa/quant.py (TWA_SCALE_P_KERNEL=native): built once per source
   version with the system compiler and loaded with ctypes. Built with -fopenmp they split the groups over
   OpenMP threads; the library resolves to the libgomp.so.1 torch has loaded, so they run on torch's own
   intra-op pool (torch.set_num_threads) instead of fighting its spinning workers for the cores.

   With AVX2 the project runs in 16-bit fixed point: on this class of core the int->float convert and the
   FMA (which takes a second pipe's register port) cap a float kernel at ~8 codes per cycle, while one
   VPMADDWD multiplies sixteen codes by g and adds pairs of them. g is rounded to int16 with one scale per
   group (max |g| / 32767): ~2^-16 of the group's largest entry, far below what the codes already lose,
   and a non-finite g still gives a non-finite result (through sum(g)). The reconstruct stays in fp32:
   rounding the coefficients to int16 as well gained 5-20% but cost 1e-4 of agreement between world
   sizes, because lo * delta and scale * delta * code cancel. The scalar fallback (no AVX2) is fp32.

   With AVX-512 one register holds a whole tile (both halves), so each instruction covers twice the columns,
   in the same lanes and the same order of additions: the results equal the AVX2 code's bit for bit (a test
   builds both and compares). The project rounds g in 512-bit registers too and adds two rows' halves in one:
   on this class of core 512-bit code runs on two vector ports, so every vector instruction counts.

   The kernels are bound by memory once P is out of cache, but only just: per tile the project takes ~3 ns and
   the reconstruct ~4 ns of compute (one thread, Xeon 2.6 GHz), against ~4.5 ns for 64 bytes from DRAM. So
   the tiles are prefetched PREFETCH_BYTES ahead and the project's g, its second stream, G_AHEAD groups ahead:
   the hardware prefetcher left each group's first lines of g waiting on DRAM. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define TWA_AVX512 1
#endif
#define TILE 64
/* prefetch this far ahead of the tile being read: the hardware prefetcher alone left the int16 project
   waiting on DRAM (17 against 31-37 codes/ns in a microbenchmark with 4 KiB) */
#define PREFETCH_BYTES 4096

#define INLINE static inline __attribute__((always_inline))

#ifdef __AVX2__
INLINE float hsum(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
#endif

/* Tiles are dword-planar (see pack_tiles): half h of a tile is eight 32-bit words; column
   h * G/2 + 8 * pos + lane is bits [pos * bits, (pos + 1) * bits) of word lane. In the (fp32) reconstruct,
   one AND leaves code << (pos * bits) in each lane, which converts to float exactly; the power of two goes
   into the final store. The top position holds bit 31 (the sign of a signed convert), so it is shifted down
   instead. */
#define HALF 32

INLINE uint32_t word_at(const uint8_t* p) { uint32_t w; memcpy(&w, p, 4); return w; }
INLINE float pos_scale(int pos, int npos, int bits) {
    return pos == npos - 1 ? 1.f : 1.f / (float)(1u << (pos * bits));
}
#ifdef __AVX2__
/* code << (pos * bits) of each lane (the top position: the code itself) */
INLINE __m256i code_at(__m256i x, int pos, int npos, int bits) {
    return pos == npos - 1 ? _mm256_srli_epi32(x, 32 - bits)
                           : _mm256_and_si256(x, _mm256_set1_epi32((int)(((1u << bits) - 1) << (pos * bits))));
}
/* Read as sixteen 16-bit lanes, lane 2 * lane (2 * lane + 1) of a half holds dword positions 0 .. npw-1
   (npw .. npos-1) of word lane; this returns code p of every 16-bit lane (a shift and an AND at most) */
INLINE __m256i word_code(__m256i y, int p, int npw, int bits, __m256i mask) {
    return p == 0 ? _mm256_and_si256(y, mask)
         : p == npw - 1 ? _mm256_srli_epi16(y, 16 - bits)
                        : _mm256_and_si256(_mm256_srli_epi16(y, p * bits), mask);
}
/* one group's k tiles, PREFETCH_BYTES ahead (a prefetch past the end of P is a no-op: it never faults) */
INLINE void prefetch_ahead(const uint8_t* tiles, int64_t k) {
    for (int64_t o = 0; o < k * TILE; o += 64) _mm_prefetch((const char*)(tiles + PREFETCH_BYTES + o), _MM_HINT_T0);
}
#endif
#ifdef TWA_AVX512
INLINE __m512i code_at512(__m512i x, int pos, int npos, int bits) {
    return pos == npos - 1 ? _mm512_srli_epi32(x, 32 - bits)
                           : _mm512_and_si512(x, _mm512_set1_epi32((int)(((1u << bits) - 1) << (pos * bits))));
}
INLINE __m512i word_code512(__m512i y, int p, int npw, int bits, __m512i mask) {
    return p == 0 ? _mm512_and_si512(y, mask)
         : p == npw - 1 ? _mm512_srli_epi16(y, 16 - bits)
                        : _mm512_and_si512(_mm512_srli_epi16(y, p * bits), mask);
}
/* acc + the pairwise products of sixteen-bit lanes (VPDPWSSD where the core has VNNI) */
INLINE __m512i madd_acc512(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
#endif

#ifdef __AVX2__
/* g is rounded to int16 group by group, with one scale per group (its max |g| / 32767): lane for lane
   in the order word_code takes the codes, dword position p in the low 16 bits and p + npw in the high.
   Both versions sum g in the same order (two chains of eight lanes), so their results are equal. */
#define G_AHEAD 2   /* groups ahead that the project prefetches g (2 and 4 measured alike, 8 worse) */
INLINE float hmax(__m256 mx) {
    __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_max_ss(h4, _mm_shuffle_ps(h4, h4, 1)));
}
/* gq[p][h]: half h's positions p and p + npw */
INLINE void quantise_g256(const float* gm, __m256i gq[16][2], float* vs, float* gsum, const int npw, const int G) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, mx = s0;
    for (int o = 0; o < G; o += 16) {
        const __m256 v0 = _mm256_loadu_ps(gm + o), v1 = _mm256_loadu_ps(gm + o + 8);
        s0 = _mm256_add_ps(s0, v0);
        s1 = _mm256_add_ps(s1, v1);
        mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)));
    }
    *gsum = hsum(_mm256_add_ps(s0, s1));
    const float amax = hmax(mx);
    const __m256 vinv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
    for (int hh = 0; hh < 2; hh++)
        for (int p = 0; p < npw; p++) {
            const float* gh = gm + hh * (G / 2);
            const __m256i lo16 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(gh + 8 * p), vinv));
            const __m256i hi16 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(gh + 8 * (p + npw)), vinv));
            gq[p][hh] = _mm256_blend_epi16(lo16, _mm256_slli_epi32(hi16, 16), 0xAA);
        }
    *vs = amax / 32767.f;
}
/* part[i] (8 lanes) += vs * the int32 dot of row i's tile with g */
INLINE void dot_tiles256(const uint8_t* tiles, int64_t k, __m256i gq[16][2], const __m256 vs, float* part,
                         const int npw, const int bits) {
    const __m256i m16 = _mm256_set1_epi16((short)((1u << bits) - 1));
    for (int64_t i = 0; i < k; i++) {
        __m256i acc = _mm256_setzero_si256();
        for (int hh = 0; hh < 2; hh++) {
            const __m256i x = _mm256_loadu_si256((const __m256i*)(tiles + i * TILE + hh * HALF));
            for (int p = 0; p < npw; p++)
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(word_code(x, p, npw, bits, m16), gq[p][hh]));
        }
        float* pr = part + i * 8;
        _mm256_store_ps(pr, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), vs, _mm256_load_ps(pr)));
    }
}
#ifdef TWA_AVX512
/* gz[p]: both halves (lanes 0-7 half 0, 8-15 half 1, as a tile is loaded) */
INLINE void quantise_g512(const float* gm, __m512i gz[16], float* vs, float* gsum, const int npw, const int G) {
    __m512 s = _mm512_setzero_ps(), mx = s;
    for (int o = 0; o < G; o += 16) {
        const __m512 v = _mm512_loadu_ps(gm + o);
        s = _mm512_add_ps(s, v);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    }
    *gsum = hsum(_mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1)));
    const float amax = hmax(_mm256_max_ps(_mm512_castps512_ps256(mx), _mm512_extractf32x8_ps(mx, 1)));
    const __m512 vinv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
    for (int p = 0; p < npw; p++) {
        const float* lo = gm + 8 * p, * hi = gm + 8 * (p + npw);
        const __m512 l = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(lo)), _mm256_loadu_ps(lo + G / 2), 1);
        const __m512 h = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(hi)), _mm256_loadu_ps(hi + G / 2), 1);
        gz[p] = _mm512_mask_blend_epi16(0xAAAAAAAA, _mm512_cvtps_epi32(_mm512_mul_ps(l, vinv)),
                                        _mm512_slli_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(h, vinv)), 16));
    }
    *vs = amax / 32767.f;
}
INLINE __m512i dot_tile512(const uint8_t* tile, const __m512i gz[16], const __m512i m16, const int npw, const int bits) {
    const __m512i x = _mm512_loadu_si512((const void*)tile);
    __m512i az = _mm512_setzero_si512();
    for (int p = 0; p < npw; p++) az = madd_acc512(az, word_code512(x, p, npw, bits, m16), gz[p]);
    return az;
}
/* as dot_tiles256, two rows at a time: the halves of rows i and i + 1 are added in one register (integer
   sums are exact: each row's eight lanes equal the AVX2 code's running sum) */
INLINE void dot_tiles512(const uint8_t* tiles, int64_t k, const __m512i gz[16], const __m512 vs, float* part,
                         const int npw, const int bits) {
    const __m512i m16 = _mm512_set1_epi16((short)((1u << bits) - 1));
    int64_t i = 0;
    for (; i + 2 <= k; i += 2) {
        const __m512i a0 = dot_tile512(tiles + i * TILE, gz, m16, npw, bits);
        const __m512i a1 = dot_tile512(tiles + (i + 1) * TILE, gz, m16, npw, bits);
        const __m512i acc = _mm512_add_epi32(_mm512_shuffle_i64x2(a0, a1, 0x44), _mm512_shuffle_i64x2(a0, a1, 0xEE));
        float* pr = part + i * 8;
        _mm512_store_ps(pr, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), vs, _mm512_load_ps(pr)));
    }
    if (i < k) {
        const __m512i a0 = dot_tile512(tiles + i * TILE, gz, m16, npw, bits);
        const __m256i acc = _mm256_add_epi32(_mm512_castsi512_si256(a0), _mm512_extracti64x4_epi64(a0, 1));
        float* pr = part + i * 8;
        _mm256_store_ps(pr, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm512_castps512_ps256(vs), _mm256_load_ps(pr)));
    }
}
#endif
#endif

/* res[i*L + coef[pid[m]]] += scale[i, b] * (codes_i . g_m) + lo[i, b] * sum(g_m), group by group;
   0, or -1 when the per-row partials cannot be allocated */
INLINE int project_body(const uint8_t* pk, const int64_t* gstart, const int64_t* pid, const int64_t* coef,
                        const float* scale, const float* lo, const float* g, double* res,
                        int64_t ng, int64_t k, int64_t nb, int64_t L, const int bits) {
    const int npos = 32 / bits, G = 16 * npos;
    const uint32_t mask = (1u << bits) - 1;
#ifdef __AVX2__
    (void)mask;
    const int npw = 16 / bits;
    /* per-row 8-lane partial dots, summed over consecutive groups of one block and flushed (horizontal
       sum, scale, lo * sum(g), into double) when the block changes or every FLUSH groups */
    enum { FLUSH = 32 };
    const size_t part_floats = (size_t)((k + 7) & ~7) * 8;
    float* part = (float*)aligned_alloc(64, part_floats * sizeof(float));
    if (part == NULL) return -1;
    memset(part, 0, part_floats * sizeof(float));
    double gsum_run = 0.;
    int run = 0;
    for (int64_t m = 0; m < ng; m++) {
        const float* gm = g + gstart[m];
        const int64_t b = pid[m], l = coef[b];
        const uint8_t* tiles = pk + m * k * TILE;
        prefetch_ahead(tiles, k);
        if (m + G_AHEAD < ng)   /* a later group's g: its own stream, which the hardware prefetcher served late */
            for (int o = 0; o < G * 4; o += 64) _mm_prefetch((const char*)(g + gstart[m + G_AHEAD]) + o, _MM_HINT_T0);
        float vs, gsum;
#ifdef TWA_AVX512
        __m512i gz[16];
        quantise_g512(gm, gz, &vs, &gsum, npw, G);
        dot_tiles512(tiles, k, gz, _mm512_set1_ps(vs), part, npw, bits);
#else
        __m256i gq[16][2];
        quantise_g256(gm, gq, &vs, &gsum, npw, G);
        dot_tiles256(tiles, k, gq, _mm256_set1_ps(vs), part, npw, bits);
#endif
        gsum_run += gsum;
        if (++run == FLUSH || m + 1 == ng || pid[m + 1] != b) {
            for (int64_t r = 0; r < k; r++) {
                const float dot = hsum(_mm256_load_ps(part + r * 8));
                res[r * L + l] += (double)scale[r * nb + b] * dot + (double)lo[r * nb + b] * gsum_run;
            }
            memset(part, 0, (size_t)k * 8 * sizeof(float));
            gsum_run = 0.;
            run = 0;
        }
    }
    free(part);
#else
    for (int64_t m = 0; m < ng; m++) {
        const float* gm = g + gstart[m];
        const int64_t b = pid[m], l = coef[b];
        float gsum = 0.f;
        for (int j = 0; j < G; j++) gsum += gm[j];
        for (int64_t i = 0; i < k; i++) {
            const uint8_t* row = pk + (m * k + i) * TILE;
            float dot = 0.f;
            for (int h = 0; h < 2; h++)
                for (int lane = 0; lane < 8; lane++) {
                    const uint32_t w = word_at(row + h * HALF + 4 * lane);
                    for (int pos = 0; pos < npos; pos++)
                        dot += (float)((w >> (pos * bits)) & mask) * gm[h * (G / 2) + pos * 8 + lane];
                }
            res[i * L + l] += (double)(scale[i * nb + b] * dot + lo[i * nb + b] * gsum);
        }
    }
#endif
    return 0;
}

/* out[gstart[m] + j] = w[...] + b[pid[m]] + sum_i a[i, pid[m]] * code_j(pk[m, i]) */
INLINE void reconstruct_body(const uint8_t* pk, const int64_t* gstart, const int64_t* pid, const float* a,
                             const float* bvec, const float* w, float* out, int64_t ng, int64_t k, int64_t nb,
                             const int bits) {
    const int npos = 32 / bits, G = 16 * npos;
    const uint32_t mask = (1u << bits) - 1;
    (void)mask;   /* the scalar fallback's */
    for (int64_t m = 0; m < ng; m++) {
        const int64_t b = pid[m];
        const float* wm = w + gstart[m];
        float* om = out + gstart[m];
#ifdef TWA_AVX512
        prefetch_ahead(pk + m * k * TILE, k);
        const __m512 bz = _mm512_set1_ps(bvec[b]);
        for (int p0 = 0; p0 < npos; p0 += 8) {   /* as below, both halves of a tile at once */
            const int np = npos - p0 < 8 ? npos - p0 : 8;
            __m512 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t i = 0; i < k; i++) {
                const __m512i x = _mm512_loadu_si512((const void*)(pk + (m * k + i) * TILE));
                const __m512 ai = _mm512_set1_ps(a[i * nb + b]);
                for (int j = 0; j < np; j++)
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(code_at512(x, p0 + j, npos, bits)), ai, acc[j]);
            }
            for (int j = 0; j < np; j++) {
                const int pos = p0 + j, o0 = pos * 8, o1 = G / 2 + pos * 8;
                const __m512 base = _mm512_add_ps(
                    _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(wm + o0)), _mm256_loadu_ps(wm + o1), 1), bz);
                const __m512 r = _mm512_fmadd_ps(acc[j], _mm512_set1_ps(pos_scale(pos, npos, bits)), base);
                _mm256_storeu_ps(om + o0, _mm512_castps512_ps256(r));
                _mm256_storeu_ps(om + o1, _mm512_extractf32x8_ps(r, 1));
            }
        }
#elif defined(__AVX2__)
        prefetch_ahead(pk + m * k * TILE, k);
        const __m256 bb = _mm256_set1_ps(bvec[b]);
        for (int h = 0; h < 2; h++)
            /* eight positions (64 columns at 4 bits) at a time: eight accumulators, each row's word loaded once */
            for (int p0 = 0; p0 < npos; p0 += 8) {
                const int np = npos - p0 < 8 ? npos - p0 : 8;
                __m256 acc[8];
                for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
                for (int64_t i = 0; i < k; i++) {
                    const __m256i x = _mm256_loadu_si256((const __m256i*)(pk + (m * k + i) * TILE + h * HALF));
                    const __m256 ai = _mm256_set1_ps(a[i * nb + b]);
                    for (int j = 0; j < np; j++) {
                        const int pos = p0 + j;
                        const __m256i v = code_at(x, pos, npos, bits);
                        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), ai, acc[j]);
                    }
                }
                for (int j = 0; j < np; j++) {
                    const int pos = p0 + j, o = h * (G / 2) + pos * 8;
                    const __m256 base = _mm256_add_ps(_mm256_loadu_ps(wm + o), bb);
                    _mm256_storeu_ps(om + o, _mm256_fmadd_ps(acc[j], _mm256_set1_ps(pos_scale(pos, npos, bits)), base));
                }
            }
#else
        float acc[512];
        memset(acc, 0, sizeof(float) * G);
        for (int64_t i = 0; i < k; i++) {
            const uint8_t* row = pk + (m * k + i) * TILE;
            const float ai = a[i * nb + b];
            for (int h = 0; h < 2; h++)
                for (int lane = 0; lane < 8; lane++) {
                    const uint32_t wd = word_at(row + h * HALF + 4 * lane);
                    for (int pos = 0; pos < npos; pos++)
                        acc[h * (G / 2) + pos * 8 + lane] += (float)((wd >> (pos * bits)) & mask) * ai;
                }
        }
        for (int j = 0; j < G; j++) om[j] = (wm[j] + bvec[b]) + acc[j];
#endif
    }
}

/* one specialised copy per bit width: the plane loops unroll and the accumulators stay in registers */
static int project_bits(const uint8_t* pk, const int64_t* gstart, const int64_t* pid, const int64_t* coef,
                         const float* scale, const float* lo, const float* g, double* res,
                         int64_t ng, int64_t k, int64_t nb, int64_t L, int64_t bits) {
    switch (bits) {
        case 1: return project_body(pk, gstart, pid, coef, scale, lo, g, res, ng, k, nb, L, 1);
        case 2: return project_body(pk, gstart, pid, coef, scale, lo, g, res, ng, k, nb, L, 2);
        case 4: return project_body(pk, gstart, pid, coef, scale, lo, g, res, ng, k, nb, L, 4);
        default: return project_body(pk, gstart, pid, coef, scale, lo, g, res, ng, k, nb, L, 8);
    }
}

static void reconstruct_bits(const uint8_t* pk, const int64_t* gstart, const int64_t* pid, const float* a,
                             const float* bvec, const float* w, float* out, int64_t ng, int64_t k, int64_t nb,
                             int64_t bits) {
    switch (bits) {
        case 1: reconstruct_body(pk, gstart, pid, a, bvec, w, out, ng, k, nb, 1); break;
        case 2: reconstruct_body(pk, gstart, pid, a, bvec, w, out, ng, k, nb, 2); break;
        case 4: reconstruct_body(pk, gstart, pid, a, bvec, w, out, ng, k, nb, 4); break;
        default: reconstruct_body(pk, gstart, pid, a, bvec, w, out, ng, k, nb, 8); break;
    }
}

/* threads for ng groups: the pool's size, but at least MIN_GROUPS groups each (a hand-off costs more than
   a few groups' work) */
#define MIN_GROUPS 1024
static int threads_for(int64_t ng) {
#ifdef _OPENMP
    int64_t t = omp_get_max_threads();
    if (t > ng / MIN_GROUPS) t = ng / MIN_GROUPS;
    return t < 1 ? 1 : (int)t;
#else
    (void)ng;
    return 1;
#endif
}

/* the vector width this build runs: 512 (AVX-512), 256 (AVX2) or 0 (the scalar fallback) */
int twa_simd_bits(void) {
#if defined(TWA_AVX512)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

/* the threads the kernels use for ng groups (tests check that OpenMP follows torch.set_num_threads) */
int twa_kernel_threads(int64_t ng) { return threads_for(ng); }

/* res (k x L doubles) += the packed product; thread t takes groups [ng t / T, ng (t + 1) / T) into its own
   partial, summed in thread order (the same T gives the same result bit for bit). 0, or -1: out of memory */
static int project_groups(const uint8_t* pk, const int64_t* gstart, const int64_t* pid, const int64_t* coef,
                          const float* scale, const float* lo, const float* g, double* res,
                          int64_t ng, int64_t k, int64_t nb, int64_t L, int64_t bits) {
    const int nt = threads_for(ng);
    double* part = nt > 1 ? (double*)calloc((size_t)(nt * k * L), sizeof(double)) : NULL;
    if (part == NULL)   /* one thread, or no memory for the partials: the plain loop */
        return project_bits(pk, gstart, pid, coef, scale, lo, g, res, ng, k, nb, L, bits);
    int failed = 0;
    #pragma omp parallel for num_threads(nt) schedule(static, 1) reduction(|:failed)
    for (int t = 0; t < nt; t++) {
        const int64_t a = ng * t / nt, e = ng * (t + 1) / nt;
        failed |= project_bits(pk + a * k * TILE, gstart + a, pid + a, coef, scale, lo, g, part + t * k * L, e - a,
                               k, nb, L, bits) != 0;
    }
    for (int t = 0; t < nt; t++)
        for (int64_t i = 0; i < k * L; i++) res[i] += part[t * k * L + i];
    free(part);
    return failed ? -1 : 0;
}

/* the threads write disjoint groups of out: the result does not depend on their number */
static void reconstruct_groups(const uint8_t* pk, const int64_t* gstart, const int64_t* pid, const float* a,
                               const float* bvec, const float* w, float* out, int64_t ng, int64_t k, int64_t nb,
                               int64_t bits) {
    const int nt = threads_for(ng);
    #pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
    for (int t = 0; t < nt; t++) {
        const int64_t s = ng * t / nt, e = ng * (t + 1) / nt;
        reconstruct_bits(pk + s * k * TILE, gstart + s, pid + s, a, bvec, w, out, e - s, k, nb, bits);
    }
}

/* The side columns (block edges and tails outside a full group, kept dequantised): side_t is S x k, the k
   rows of each column contiguous; scoef its coefficient column. In C because, done as five torch ops a step,
   the gathers and the scatter cost 10-17% of a 4-bit step at W = 2. */
#define SIDE_ROWS 64

/* res (k x L doubles) += side . g, per coefficient column; rows in chunks of SIDE_ROWS accumulated in fp32 */
static void side_project(const float* side_t, const int64_t* idx, const int64_t* scoef, const float* g, double* res,
                         int64_t S, int64_t k, int64_t L) {
    for (int64_t i0 = 0; i0 < k; i0 += SIDE_ROWS) {
        const int64_t ni = k - i0 < SIDE_ROWS ? k - i0 : SIDE_ROWS;
        float acc[SIDE_ROWS] = {0};
        for (int64_t j = 0; j < S; j++) {
            const float gj = g[idx[j]];
            const float* sj = side_t + j * k + i0;
            for (int64_t i = 0; i < ni; i++) acc[i] += sj[i] * gj;
            if (j + 1 == S || scoef[j + 1] != scoef[j]) {   /* a run of one coefficient ends */
                for (int64_t i = 0; i < ni; i++) res[(i0 + i) * L + scoef[j]] += acc[i];
                memset(acc, 0, sizeof acc);
            }
        }
    }
}

/* out[idx[j]] = w[idx[j]] + sum_i side_t[j, i] * delta[i, scoef[j]]  (delta: k x L fp32) */
static void side_reconstruct(const float* side_t, const int64_t* idx, const int64_t* scoef, const float* delta,
                             const float* w, float* out, int64_t S, int64_t k, int64_t L) {
    float dcol[SIDE_ROWS];
    for (int64_t j = 0; j < S; j++) out[idx[j]] = w[idx[j]];
    for (int64_t i0 = 0; i0 < k; i0 += SIDE_ROWS) {
        const int64_t ni = k - i0 < SIDE_ROWS ? k - i0 : SIDE_ROWS;
        int64_t cur = -1;
        for (int64_t j = 0; j < S; j++) {
            if (scoef[j] != cur) {   /* this chunk of the coefficient column, contiguous */
                cur = scoef[j];
                for (int64_t i = 0; i < ni; i++) dcol[i] = delta[(i0 + i) * L + cur];
            }
            const float* sj = side_t + j * k + i0;
#ifdef __AVX2__
            __m256 s8 = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= ni; i += 8) s8 = _mm256_fmadd_ps(_mm256_loadu_ps(sj + i), _mm256_loadu_ps(dcol + i), s8);
            float s = hsum(s8);
#else
            float s = 0.f;
            int64_t i = 0;
#endif
            for (; i < ni; i++) s += sj[i] * dcol[i];
            out[idx[j]] += s;
        }
    }
}

/* The entry points: one call per product, so that a step crosses from Python into C twice. Each call from
   Python costs tens of microseconds once the caches are cold (as after a forward and backward pass), as does
   each small torch op: the packed step used to make four calls and eight small ops around them. For the same
   reason the reconstruct takes theta and theta0 and forms their difference itself (three torch ops, ~0.1 ms
   cold), and GroupedP passes its fixed arguments as pointers resolved once. */

/* c (k x L fp32) = this slice's P times g: the side columns, then the packed groups, summed in double.
   0, or -1 when out of memory */
int twa_project(const float* side_t, const int64_t* side_idx, const int64_t* side_coef, const uint8_t* pk,
                const int64_t* gstart, const int64_t* pid, const int64_t* coef, const float* scale, const float* lo,
                const float* g, float* c, int64_t S, int64_t ng, int64_t k, int64_t nb, int64_t L, int64_t bits) {
    double* res = (double*)calloc((size_t)(k * L), sizeof(double));
    if (res == NULL) return -1;
    side_project(side_t, side_idx, side_coef, g, res, S, k, L);
    const int rc = ng ? project_groups(pk, gstart, pid, coef, scale, lo, g, res, ng, k, nb, L, bits) : 0;
    for (int64_t i = 0; i < k * L; i++) c[i] = (float)res[i];
    free(res);
    return rc;
}

/* out = w + this slice's P transposed times delta = theta - theta0 (k x L float64, rounded to fp32 as torch
   does). Per block b the groups need a[i, b] = scale[i, b] * delta[i, coef[b]] and the offset
   sum_i lo[i, b] * delta[i, coef[b]]. 0, or -1 when out of memory */
int twa_reconstruct(const float* side_t, const int64_t* side_idx, const int64_t* side_coef, const uint8_t* pk,
                    const int64_t* gstart, const int64_t* pid, const int64_t* coef, const float* scale,
                    const float* lo, const double* theta, const double* theta0, const float* w, float* out, int64_t S,
                    int64_t ng, int64_t k, int64_t nb, int64_t L, int64_t bits) {
    float* a = (float*)malloc((size_t)((k + 1) * nb + k * L) * sizeof(float));
    if (a == NULL) return -1;
    float* offset = a + k * nb;
    float* delta = offset + nb;
    for (int64_t i = 0; i < k * L; i++) delta[i] = (float)(theta[i] - theta0[i]);
    for (int64_t b = 0; b < nb; b++) {
        float s = 0.f;
        for (int64_t i = 0; i < k; i++) {
            const float d = delta[i * L + coef[b]];
            a[i * nb + b] = scale[i * nb + b] * d;
            s += lo[i * nb + b] * d;
        }
        offset[b] = s;
    }
    side_reconstruct(side_t, side_idx, side_coef, delta, w, out, S, k, L);
    if (ng) reconstruct_groups(pk, gstart, pid, a, offset, w, out, ng, k, nb, bits);
    free(a);
    return 0;
}
