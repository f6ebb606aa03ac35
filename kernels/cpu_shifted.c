/* Shifted token moves on the CPU: the C twin of rope_shift.py's Triton kernel.
 *
 * Token t goes from source slot src_slot[t] (block * N + offset) of the source views to
 * destination slot dst_slot[t] (-1: skipped) of the destination views; its K is rotated
 * by its run's angles (cos/sin of run[t], -1: not rotated) and V is copied.  A view is
 * described by its block and head strides and two offset tables, all in elements: the
 * offset of token o inside a block (tok_off[o]) and of head dim d inside a head
 * (dim_off[d]).  That covers every paged layout `paged_kv_views` returns (4-D views,
 * vLLM's CPU `vec` layout with K stored dim-major, AMX-packed pages) without a branch
 * per layout; cpu_native.py builds the tables from the views' strides.
 *
 * Arithmetic: the rotation is the CPU paths' `rotate_pairs_`, done per pair in float32,
 * a product, then a second product added (y = a*cos; y += b*(-sin)), rounded once into
 * the cache's dtype (round to nearest even; bf16 NaN as torch's vectorized conversion
 * writes it).  `fused` picks a fused multiply-add for the second step, which is what
 * the installed torch was found to do (cpu_native.py checks it against torch once).
 * Delta-0 tokens and V are copied bit for bit.
 *
 * Built by cpu_native.py with -O2 -ffp-contract=off, so the compiler does not fuse
 * anything on its own.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { PC_F32 = 0, PC_BF16 = 1, PC_F16 = 2 };

/* One view: element base pointer, block stride, head stride, offset tables. */
typedef struct {
    char *base;
    int64_t block_stride;
    int64_t head_stride;
    const int64_t *tok_off;
    const int64_t *dim_off;
    int64_t *run2;  /* run2[o]: tokens from o on whose offsets step by 2 (AMX K's groups) */
    int64_t *drun2; /* drun2[d]: head dims from d on whose offsets step by 2 (AMX V's) */
} pc_view;

static inline __attribute__((always_inline)) float pc_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t pc_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0xffff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float pc_f16_to_f32(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}

static inline uint16_t pc_f32_to_f16(float f) {
    _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, 2);
    return h;
}

#define PC_INLINE static inline __attribute__((always_inline))

/* Whether 16-bit halves of a 4-byte word sit low half first (pc_join_halves). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define PC_LE 1
#else
#define PC_LE 0
#endif

PC_INLINE float pc_load(const char *p, int dtype) {
    uint16_t h;
    float f;
    if (dtype == PC_F32) {
        memcpy(&f, p, 4);
        return f;
    }
    memcpy(&h, p, 2);
    return dtype == PC_BF16 ? pc_bf16_to_f32(h) : pc_f16_to_f32(h);
}

PC_INLINE void pc_store(char *p, float f, int dtype) {
    uint16_t h;
    if (dtype == PC_F32) {
        memcpy(p, &f, 4);
        return;
    }
    h = dtype == PC_BF16 ? pc_f32_to_bf16(f) : pc_f32_to_f16(f);
    memcpy(p, &h, 2);
}

/* Piece p: `length` tokens from source slot src_slot[p] on, to destination slot
 * dst_slot[p] on, all inside one source and one destination block, K rotated by angle
 * row run[p] (-1: not rotated). */
/* What a kind (K or V) of both sides' pages allows a copy to merge, found from the
 * offset tables (cpu_shifted_flags): head dims consecutive (4-D token-major pages: a
 * token's head is one memcpy), tokens consecutive (dim-major pages, vLLM's CPU `vec`
 * K: a dim's run of tokens is one memcpy), pairs of dims adjacent (AMX K: 4-byte
 * words), pairs of tokens adjacent (AMX V: 4-byte words where a piece starts on a pair
 * on both sides). */
typedef struct {
    int dims, tokens, dim_pairs, token_pairs, dim_steps2;
} pc_merge;

/* Piece p: `length` tokens from source slot src_slot[p] on, to destination slot
 * dst_slot[p] on, all inside one source and one destination block, K rotated by angle
 * row run[p] (-1: not rotated). */
typedef struct {
    int64_t pieces, H, D, N, rotary_dim;
    int neox;
    const int64_t *src_slot, *dst_slot, *length;
    const int32_t *run;
    const float *cos_tab, *sin_tab;
    pc_view v[4];
    pc_merge merge[2];
    char *scratch; /* 8 N bytes: a piece's rotated K words of two pairs of dims */
} pc_job;

/* Tokens from source offset so and destination offset dst_o on (at most `left`) whose
 * offsets step by 2 elements on both sides: on AMX-packed K a run inside a 16-token
 * group, where each token's pairs of dims are 4-byte words side by side. */
PC_INLINE int64_t pc_run2(const pc_view *s, int64_t so, const pc_view *d, int64_t dst_o,
                          int64_t left) {
    int64_t r = s->run2[so] < d->run2[dst_o] ? s->run2[so] : d->run2[dst_o];
    return r < left ? r : left;
}

/* Dims [from, to) of one head of L tokens, element by element, the tokens inner. */
static void pc_copy_tokens(const pc_view *s, const char *sh, int64_t so, const pc_view *d,
                           char *dh, int64_t dst_o, int64_t L, int64_t from, int64_t to,
                           int esize) {
    const int64_t *stok = s->tok_off + so, *dtok = d->tok_off + dst_o;
    int64_t i, t;
    for (i = from; i < to; i++) {
        if (esize == 2) {
            const uint16_t *src = (const uint16_t *)sh + s->dim_off[i];
            uint16_t *dst = (uint16_t *)dh + d->dim_off[i];
            for (t = 0; t < L; t++)
                dst[dtok[t]] = src[stok[t]];
        } else {
            const uint32_t *src = (const uint32_t *)sh + s->dim_off[i];
            uint32_t *dst = (uint32_t *)dh + d->dim_off[i];
            for (t = 0; t < L; t++)
                dst[dtok[t]] = src[stok[t]];
        }
    }
}

/* The 4-byte word at o <- high half of the word at a, then low half of the one at b
 * (little-endian: a pair's odd token, then the next pair's even one). */
PC_INLINE void pc_join_halves(char *o, const char *a, const char *b) {
    uint32_t wa, wb, w;
    memcpy(&wa, a, 4);
    memcpy(&wb, b, 4);
    w = (wa >> 16) | (wb << 16);
    memcpy(o, &w, 4);
}

/* 16 words of pc_join_halves through local copies, so that the compiler, sure that
 * nothing overlaps, moves them as vectors. */
PC_INLINE void pc_join_halves16(char *o, const char *a, const char *b) {
    uint32_t wa[16], wb[16], w[16];
    int j;
    memcpy(wa, a, sizeof wa);
    memcpy(wb, b, sizeof wb);
    for (j = 0; j < 16; j++)
        w[j] = (wa[j] >> 16) | (wb[j] << 16);
    memcpy(o, w, sizeof w);
}

/* Head dims from i on (below `to`) whose offsets step by 2 on both sides. */
PC_INLINE int64_t pc_drun2(const pc_view *s, const pc_view *d, int64_t i, int64_t to) {
    int64_t r = s->drun2[i] < d->drun2[i] ? s->drun2[i] : d->drun2[i];
    return r < to - i ? r : to - i;
}

/* Dims [from, to) of one head of a piece's tokens (offsets so, dst_o in their blocks),
 * bit for bit, as few and as wide moves as the layout allows; else dim by dim with the
 * piece's tokens inner (on packed pages a dim's tokens lie close together). */
PC_INLINE void pc_copy(const pc_view *s, const char *sh, int64_t so, const pc_view *d,
                       char *dh, int64_t dst_o, int64_t L, int64_t from, int64_t to,
                       int esize, const pc_merge *m) {
    const int64_t *stok = s->tok_off + so, *dtok = d->tok_off + dst_o;
    int64_t i, t;
    if (m->dims) {
        for (t = 0; t < L; t++)
            memcpy(dh + (dtok[t] + d->dim_off[from]) * esize,
                   sh + (stok[t] + s->dim_off[from]) * esize, (size_t)((to - from) * esize));
        return;
    }
    if (m->tokens) {
        for (i = from; i < to; i++)
            memcpy(dh + (dtok[0] + d->dim_off[i]) * esize, sh + (stok[0] + s->dim_off[i]) * esize,
                   (size_t)(L * esize));
        return;
    }
    if (esize == 2 && m->dim_pairs && from % 2 == 0 && to % 2 == 0) {
        int64_t r;
        for (t = 0; t < L; t += r) {  /* a run's words of one pair of dims: one memcpy */
            r = pc_run2(s, so + t, d, dst_o + t, L - t);
            for (i = from; i < to; i += 2)
                memcpy(dh + (dtok[t] + d->dim_off[i]) * 2, sh + (stok[t] + s->dim_off[i]) * 2,
                       (size_t)(4 * r));
        }
        return;
    }
    if (esize == 2 && m->token_pairs && (so % 2 == dst_o % 2 || PC_LE)) {
        /* AMX V: a destination pair of tokens' run of dims is one run of 4-byte words.
         * Where the source's pairs line up, it is the source's run of words; where they
         * are off by one token, each word joins the high half of one source word (an odd
         * token) and the low half of the next pair's word (a loop the compiler
         * vectorizes; the source word read starts one token before the piece at most,
         * inside the same block's page).  An odd first token and an unpaired last one
         * move by elements. */
        int64_t r, j;
        t = 0;
        if (dst_o % 2) {
            pc_copy_tokens(s, sh, so, d, dh, dst_o, 1, from, to, esize);
            t = 1;
        }
        for (; t + 1 < L; t += 2)
            for (i = from; i < to; i += r) {
                char *wo = dh + (dtok[t] + d->dim_off[i]) * 2;
                r = pc_drun2(s, d, i, to);
                if (so % 2 == dst_o % 2) {
                    memcpy(wo, sh + (stok[t] + s->dim_off[i]) * 2, (size_t)(4 * r));
                    continue;
                }
                const char *wa = sh + (stok[t] - 1 + s->dim_off[i]) * 2;
                const char *wb = sh + (stok[t + 1] + s->dim_off[i]) * 2;
                if (r == 16)  /* AMX's runs */
                    pc_join_halves16(wo, wa, wb);
                else
                    for (j = 0; j < r; j++)
                        pc_join_halves(wo + 4 * j, wa + 4 * j, wb + 4 * j);
            }
        if (t < L)
            pc_copy_tokens(s, sh, so + t, d, dh, dst_o + t, 1, from, to, esize);
        return;
    }
    if (esize == 2 && m->dim_steps2) {
        /* AMX V off its token pairs: a token's head dims step by 2 elements in runs of
         * 16 on both sides, copied run by run, token by token. */
        int64_t r, j;
        for (t = 0; t < L; t++) {
            for (i = from; i < to; i += r) {
                const uint16_t *src = (const uint16_t *)sh + stok[t] + s->dim_off[i];
                uint16_t *dst = (uint16_t *)dh + dtok[t] + d->dim_off[i];
                r = pc_drun2(s, d, i, to);
                for (j = 0; j < r; j++)
                    dst[2 * j] = src[2 * j];
            }
        }
        return;
    }
    pc_copy_tokens(s, sh, so, d, dh, dst_o, L, from, to, esize);
}

/* A pair's new values, `rotate_pairs_`'s arithmetic. */
#define PC_ROT_A(a, b) (fused ? fmaf(b, nsn, (a) * c) : (a) * c + (b) * nsn)
#define PC_ROT_B(a, b) (fused ? fmaf(a, sn_, (b) * c) : (b) * c + (a) * sn_)

/* r tokens' words of dims (i, i + 1) at sa and of (i + half, i + 1 + half) at sb,
 * rotated into da and db (2r elements each; cs, sn: the angles of pairs i and i + 1). */
PC_INLINE void pc_rotate_words_n(char *da, char *db, const char *sa, const char *sb,
                                 int64_t r, int dtype, int fused, const float *cs,
                                 const float *sn) {
    float c0 = cs[0], c1 = cs[1], s0 = sn[0], s1 = sn[1];
    int64_t e;
    for (e = 0; e < 2 * r; e += 2) {
        float a0 = pc_load(sa + e * 2, dtype), b0 = pc_load(sb + e * 2, dtype);
        float a1 = pc_load(sa + e * 2 + 2, dtype), b1 = pc_load(sb + e * 2 + 2, dtype);
        float c = c0, sn_ = s0, nsn = -s0;
        pc_store(da + e * 2, PC_ROT_A(a0, b0), dtype);
        pc_store(db + e * 2, PC_ROT_B(a0, b0), dtype);
        c = c1; sn_ = s1; nsn = -s1;
        pc_store(da + e * 2 + 2, PC_ROT_A(a1, b1), dtype);
        pc_store(db + e * 2 + 2, PC_ROT_B(a1, b1), dtype);
    }
}

/* The same, a whole 16-token group's run (AMX's) with a trip count the compiler
 * vectorizes without a scalar tail. */
PC_INLINE void pc_rotate_words(char *da, char *db, const char *sa, const char *sb, int64_t r,
                               int dtype, int fused, const float *cs, const float *sn) {
    if (r == 16)
        pc_rotate_words_n(da, db, sa, sb, 16, dtype, fused, cs, sn);
    else
        pc_rotate_words_n(da, db, sa, sb, r, dtype, fused, cs, sn);
}

/* One head of a piece's tokens, rotated: each pair of dims in [0, rotary_dim) by its
 * angle (one per pair for the whole piece), the piece's tokens inner; the other dims
 * copied. */
PC_INLINE void pc_rotate(const pc_view *s, const char *sh, int64_t so, const pc_view *d,
                         char *dh, int64_t dst_o, int64_t L, int64_t D, int esize, int dtype,
                         int64_t rotary_dim, int neox, int fused, const float *cs,
                         const float *sn, const pc_merge *m, char *scratch) {
    const int64_t *stok = s->tok_off + so, *dtok = d->tok_off + dst_o;
    int64_t half = rotary_dim / 2, i, t;
    if (neox && esize == 2 && m->dim_pairs && half % 2 == 0) {
        /* AMX-packed K: dims (i, i + 1) share a word and a run's words lie side by side,
         * so pairs (i, i + 1) of r tokens are 2r consecutive elements on each of their
         * four sides, rotated as such (the compiler vectorizes this loop).  Where the
         * destination's 16-token groups do not line up with the source's, the runs both
         * allow are short: the source's runs are rotated into the scratch, which then
         * moves to the destination a run of words at a time. */
        int64_t r;
        if (scratch && pc_run2(s, so, d, dst_o, L) < (s->run2[so] < L ? s->run2[so] : L)) {
            char *xa = scratch, *xb = scratch + 4 * L;
            for (i = 0; i < half; i += 2) {
                for (t = 0; t < L; t += r) {
                    r = s->run2[so + t] < L - t ? s->run2[so + t] : L - t;
                    pc_rotate_words(xa + 4 * t, xb + 4 * t,
                                    sh + (stok[t] + s->dim_off[i]) * 2,
                                    sh + (stok[t] + s->dim_off[i + half]) * 2, r, dtype, fused,
                                    cs + i, sn + i);
                }
                for (t = 0; t < L; t += r) {
                    r = d->run2[dst_o + t] < L - t ? d->run2[dst_o + t] : L - t;
                    memcpy(dh + (dtok[t] + d->dim_off[i]) * 2, xa + 4 * t, (size_t)(4 * r));
                    memcpy(dh + (dtok[t] + d->dim_off[i + half]) * 2, xb + 4 * t,
                           (size_t)(4 * r));
                }
            }
        } else {
            for (t = 0; t < L; t += r) {
                r = pc_run2(s, so + t, d, dst_o + t, L - t);
                for (i = 0; i < half; i += 2)
                    pc_rotate_words(dh + (dtok[t] + d->dim_off[i]) * 2,
                                    dh + (dtok[t] + d->dim_off[i + half]) * 2,
                                    sh + (stok[t] + s->dim_off[i]) * 2,
                                    sh + (stok[t] + s->dim_off[i + half]) * 2, r, dtype, fused,
                                    cs + i, sn + i);
            }
        }
        if (rotary_dim < D)
            pc_copy(s, sh, so, d, dh, dst_o, L, rotary_dim, D, esize, m);
        return;
    }
    for (i = 0; i < half; i++) {
        int64_t ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
        const char *sa = sh + s->dim_off[ia] * esize, *sb = sh + s->dim_off[ib] * esize;
        char *da = dh + d->dim_off[ia] * esize, *db = dh + d->dim_off[ib] * esize;
        float c = cs[i], sn_ = sn[i], nsn = -sn[i];
        if (m->tokens) {  /* a dim's tokens consecutive: a loop the compiler vectorizes */
            sa += stok[0] * esize; sb += stok[0] * esize;
            da += dtok[0] * esize; db += dtok[0] * esize;
            for (t = 0; t < L; t++) {
                float a = pc_load(sa + t * esize, dtype), b = pc_load(sb + t * esize, dtype);
                pc_store(da + t * esize, PC_ROT_A(a, b), dtype);
                pc_store(db + t * esize, PC_ROT_B(a, b), dtype);
            }
            continue;
        }
        for (t = 0; t < L; t++) {
            float a = pc_load(sa + stok[t] * esize, dtype);
            float b = pc_load(sb + stok[t] * esize, dtype);
            pc_store(da + dtok[t] * esize, PC_ROT_A(a, b), dtype);
            pc_store(db + dtok[t] * esize, PC_ROT_B(a, b), dtype);
        }
    }
    if (rotary_dim < D)
        pc_copy(s, sh, so, d, dh, dst_o, L, rotary_dim, D, esize, m);
}

PC_INLINE int64_t pc_run(const pc_job *job, int dtype, int fused) {
    int esize = dtype == PC_F32 ? 4 : 2, k;
    int64_t half = job->rotary_dim / 2, N = job->N, moved = 0, p, h;
    for (p = 0; p < job->pieces; p++) {
        int64_t ss = job->src_slot[p], ds = job->dst_slot[p], L = job->length[p];
        int32_t r = job->run[p];
        for (k = 0; k < 2; k++) {
            const pc_view *s = &job->v[k], *d = &job->v[k + 2];
            const char *sp = s->base + s->block_stride * (ss / N) * esize;
            char *dp = d->base + d->block_stride * (ds / N) * esize;
            int rotate = k == 0 && r >= 0 && job->rotary_dim > 0;
            for (h = 0; h < job->H; h++) {
                const char *sh = sp + s->head_stride * h * esize;
                char *dh = dp + d->head_stride * h * esize;
                if (rotate)
                    pc_rotate(s, sh, ss % N, d, dh, ds % N, L, job->D, esize, dtype,
                              job->rotary_dim, job->neox, fused,
                              job->cos_tab + (int64_t)r * half,
                              job->sin_tab + (int64_t)r * half, &job->merge[k],
                              job->scratch);
                else
                    pc_copy(s, sh, ss % N, d, dh, ds % N, L, 0, job->D, esize, &job->merge[k]);
            }
        }
        moved += L;
    }
    return moved;
}

/* Whether off[i + 1] == off[i] + 1 for every i in [0, n - 1) (step 1) or every even i
 * (step 2). */
static int pc_adjacent(const int64_t *off, int64_t n, int step) {
    int64_t i;
    for (i = 0; i + 1 < n; i += step)
        if (off[i + 1] != off[i] + 1) return 0;
    return 1;
}

/* views: src K, src V, dst K, dst V of `layers` layers laid out alike (bases: 4 x layers
 * pointers to their first elements, layer by layer; strides: block and head stride of
 * each kind; tok_off: 4 x N; dim_off: 4 x D), the plan's pieces moved in every layer.
 * cos/sin: [runs][rotary_dim / 2] float32.  Returns the number of tokens moved (summed
 * over layers), -1 where its scratch could not be allocated. */
int64_t pc_shifted_move(int dtype, int64_t pieces, int64_t H, int64_t D, int64_t N,
                        int64_t rotary_dim, int neox, int fused, const int64_t *src_slot,
                        const int64_t *dst_slot, const int64_t *length, const int32_t *run,
                        const float *cos_tab,
                        const float *sin_tab, int64_t layers, char *const *bases,
                        const int64_t *strides, const int64_t *tok_off,
                        const int64_t *dim_off) {
    pc_job job;
    int64_t *run2, moved = 0, layer;
    int k;
    job.pieces = pieces; job.H = H; job.D = D; job.N = N; job.rotary_dim = rotary_dim;
    job.neox = neox; job.src_slot = src_slot; job.dst_slot = dst_slot; job.length = length;
    job.run = run;
    job.cos_tab = cos_tab; job.sin_tab = sin_tab;
    run2 = (int64_t *)malloc(sizeof(int64_t) * 4 * (size_t)(N + D) + 8 * (size_t)N);
    if (!run2) return -1;
    job.scratch = (char *)(run2 + 4 * (N + D));
    for (k = 0; k < 4; k++) {
        int64_t o;
        job.v[k].run2 = run2 + k * N;
        for (o = N - 1; o >= 0; o--)
            job.v[k].run2[o] = o + 1 < N && tok_off[k * N + o + 1] == tok_off[k * N + o] + 2
                               ? job.v[k].run2[o + 1] + 1 : 1;
        job.v[k].drun2 = run2 + 4 * N + k * D;
        for (o = D - 1; o >= 0; o--)
            job.v[k].drun2[o] = o + 1 < D && dim_off[k * D + o + 1] == dim_off[k * D + o] + 2
                                ? job.v[k].drun2[o + 1] + 1 : 1;
        job.v[k].block_stride = strides[2 * k];
        job.v[k].head_stride = strides[2 * k + 1];
        job.v[k].tok_off = tok_off + k * N;
        job.v[k].dim_off = dim_off + k * D;
    }
    for (k = 0; k < 2; k++) {
        const pc_view *s = &job.v[k], *d = &job.v[k + 2];
        job.merge[k].dims = pc_adjacent(s->dim_off, D, 1) && pc_adjacent(d->dim_off, D, 1);
        job.merge[k].tokens = pc_adjacent(s->tok_off, N, 1) && pc_adjacent(d->tok_off, N, 1);
        job.merge[k].dim_pairs = D % 2 == 0 && pc_adjacent(s->dim_off, D, 2)
                                 && pc_adjacent(d->dim_off, D, 2);
        job.merge[k].token_pairs = N % 2 == 0 && pc_adjacent(s->tok_off, N, 2)
                                   && pc_adjacent(d->tok_off, N, 2);
        job.merge[k].dim_steps2 = s->drun2[0] >= 4 && d->drun2[0] >= 4;
    }
    for (layer = 0; layer < layers; layer++) {
        for (k = 0; k < 4; k++)
            job.v[k].base = bases[4 * layer + k];
        switch (dtype * 2 + (fused ? 1 : 0)) {
        case PC_F32 * 2: moved += pc_run(&job, PC_F32, 0); break;
        case PC_F32 * 2 + 1: moved += pc_run(&job, PC_F32, 1); break;
        case PC_BF16 * 2: moved += pc_run(&job, PC_BF16, 0); break;
        case PC_BF16 * 2 + 1: moved += pc_run(&job, PC_BF16, 1); break;
        case PC_F16 * 2: moved += pc_run(&job, PC_F16, 0); break;
        default: moved += pc_run(&job, PC_F16, 1); break;
        }
    }
    free(run2);
    return moved;
}
