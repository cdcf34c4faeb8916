/* Masked top-k of float32 score rows: the kernel behind dprec.training.metrics.masked_topk.
 *
 * For each row r of scores (b x n, row-major) the k best columns, the masked (row, column) pairs left out, in
 * descending order of score. Two passes over the row, eight scores per operation: the first takes the maxima of
 * W-column chunks (masked columns left out; W a power of two, 8 to 64, so that there are about 4 (k + 1) chunks),
 * whose (k+1)-th largest t is a lower bound of the row's (k+1)-th best unmasked score; the second pushes the
 * unmasked scores >= t, and above the smallest of the k + 1 best so far, into a min-heap (a few k + 1 of them
 * where the scores are distinct). A row is decided (ok[r] = 1) only where its k + 1 best unmasked scores are strictly
 * decreasing and finite at the (k+1)-th: then its top k is unique, and so what any exact method returns. Rows with
 * a tie there, a NaN, or fewer than k + 1 unmasked scores above -inf get ok[r] = 0 and are left to the caller.
 *
 * Return value: 0; -1 if the masked pairs are not sorted by row, then column; -2 if one is out of range; -3 if k
 * is not in 1 .. n - 1; -4 if memory could not be allocated. Nothing is written into scores or the pairs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Four floats per operation, in the GCC / Clang vector extension (SSE, AVX or NEON as the target has). */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4f load4(const float *p) {
    v4f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Lanewise a > b ? a : b: a NaN in a never replaces b. */
static inline v4f max4(v4f a, v4f b) {
    v4i gt = a > b;
    return (v4f)(((v4i)a & gt) | ((v4i)b & ~gt));
}

static inline int any4(v4i x) {
    int32_t any = 0;
    for (int t = 0; t < 4; t++) any |= x[t];
    return any != 0;
}

/* Reorder v (and ix, unless NULL) so that the kk largest come first, v[kk - 1] the kk-th largest: Hoare's
 * selection (no NaN in v). */
static void select_largest(float *v, int64_t *ix, int64_t n, int64_t kk) {
    int64_t lo = 0, hi = n - 1, k = kk - 1;
    while (lo < hi) {
        float pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                float x = v[i];
                v[i] = v[j];
                v[j] = x;
                if (ix) {
                    int64_t y = ix[i];
                    ix[i] = ix[j];
                    ix[j] = y;
                }
                i++;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return;
    }
}

/* The k-th largest (0-based) of a[0 .. n) (no NaN), reordering a. */
static float kth_largest(float *a, int64_t n, int64_t k) {
    select_largest(a, NULL, n, k + 1);
    return a[k];
}

static void sift_down(float *v, int64_t *ix, int64_t size, int64_t i) {
    float x = v[i];
    int64_t xi = ix[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= size) break;
        if (c + 1 < size && v[c + 1] < v[c]) c++;
        if (!(v[c] < x)) break;
        v[i] = v[c];
        ix[i] = ix[c];
        i = c;
    }
    v[i] = x;
    ix[i] = xi;
}

static void sift_up(float *v, int64_t *ix, int64_t i) {
    float x = v[i];
    int64_t xi = ix[i];
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (!(x < v[p])) break;
        v[i] = v[p];
        ix[i] = ix[p];
        i = p;
    }
    v[i] = x;
    ix[i] = xi;
}

static int is_masked(const int64_t *cols, int64_t count, int64_t j) {
    int64_t lo = 0, hi = count;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (cols[mid] < j) lo = mid + 1;
        else hi = mid;
    }
    return lo < count && cols[lo] == j;
}

/* 0 if the masked pairs are in range and sorted by row, then column; -2 if one is out of range, else -1. */
static int64_t check_pairs(const int64_t *mrows, const int64_t *mcols, int64_t m, int64_t b, int64_t n) {
    for (int64_t t = 0; t < m; t++) {
        if (mrows[t] < 0 || mrows[t] >= b || mcols[t] < 0 || mcols[t] >= n) return -2;
        if (t && (mrows[t] < mrows[t - 1] || (mrows[t] == mrows[t - 1] && mcols[t] < mcols[t - 1]))) return -1;
    }
    return 0;
}

/* v[0 .. kk) in descending order: write the first kk - 1 columns to out and return 1 where the values are strictly
 * decreasing and the last is above -inf (the top kk - 1 is then unique), else return 0. */
static int emit_if_unique(const float *v, const int64_t *ix, int64_t kk, int64_t *out) {
    if (!(v[kk - 1] > -INFINITY)) return 0;
    for (int64_t t = 0; t + 1 < kk; t++)
        if (!(v[t] > v[t + 1])) return 0;
    for (int64_t t = 0; t + 1 < kk; t++) out[t] = ix[t];
    return 1;
}

int64_t dprec_masked_topk_f32(const float *scores, int64_t b, int64_t n, const int64_t *mrows, const int64_t *mcols,
                              int64_t m, int64_t k, int64_t *out, uint8_t *ok) {
    int64_t kk = k + 1;
    if (k < 1 || kk > n) return -3;
    int64_t pairs = check_pairs(mrows, mcols, m, b, n);
    if (pairs) return pairs;
    int64_t w = 64;
    while (w > 8 && n / w < 4 * kk) w /= 2;
    int64_t full = n / w, chunks = full + (n % w != 0);
    float *hv = malloc((size_t)kk * sizeof(float));
    int64_t *hi = malloc((size_t)kk * sizeof(int64_t));
    float *cmax = malloc((size_t)chunks * sizeof(float));
    if (!hv || !hi || !cmax) {
        free(hv);
        free(hi);
        free(cmax);
        return -4;
    }
    const v4f neg = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t p = 0;
    for (int64_t r = 0; r < b; r++) {
        const float *row = scores + r * n;
        int64_t p0 = p;
        while (p < m && mrows[p] == r) p++;
        const int64_t *mc = mcols + p0;
        int64_t nm = p - p0, size = 0;
        int bad = 0;
        ok[r] = 0;
        /* pass 1: chunk maxima (a NaN is no maximum: it passes pass 2's test, and an unmasked one fails the row) */
        for (int64_t c = 0; c < full; c++) {
            const float *q = row + c * w;
            v4f mx = neg;
            for (int64_t j = 0; j < w; j += 4) mx = max4(load4(q + j), mx);
            float best = -INFINITY;
            for (int t = 0; t < 4; t++) best = mx[t] > best ? mx[t] : best;
            cmax[c] = best;
        }
        if (n % w) {
            float best = -INFINITY;
            for (int64_t j = full * w; j < n; j++)
                if (row[j] > best && !is_masked(mc, nm, j)) best = row[j];
            cmax[full] = best;
        }
        for (int64_t t = 0; t < nm;) { /* chunks with masked columns: their maxima again, without them */
            int64_t c = mc[t] / w, end = t;
            while (end < nm && mc[end] / w == c) end++;
            if (c < full) {
                float best = -INFINITY;
                for (int64_t j = c * w; j < (c + 1) * w; j++)
                    if (row[j] > best && !is_masked(mc + t, end - t, j)) best = row[j];
                cmax[c] = best;
            }
            t = end;
        }
        float thr = chunks >= kk ? kth_largest(cmax, chunks, kk - 1) : -INFINITY;
        v4f thr4 = {thr, thr, thr, thr};
        /* pass 2: the unmasked scores >= t (while the heap fills), then > its minimum */
        for (int64_t c = 0; c < chunks && !bad; c++) {
            int64_t j0 = c * w, j1 = c < full ? j0 + w : n;
            if (c < full) {
                v4i above = {0};
                for (int64_t j = j0; j < j1; j += 4) above |= ~(load4(row + j) < thr4);
                if (!any4(above)) continue;
            }
            for (int64_t j = j0; j < j1 && !bad; j += 4) {
                int64_t lanes = j + 4 <= j1 ? 4 : j1 - j;
                if (lanes == 4 && !any4(~(load4(row + j) < thr4))) continue;
                for (int64_t i = j; i < j + lanes; i++) {
                    float v = row[i];
                    if (size < kk ? v < thr : v <= thr) continue;
                    if (is_masked(mc, nm, i)) continue;
                    if (v != v) {
                        bad = 1;
                        break;
                    }
                    if (size < kk) {
                        hv[size] = v;
                        hi[size] = i;
                        sift_up(hv, hi, size);
                        size++;
                        if (size < kk) continue;
                    } else {
                        hv[0] = v;
                        hi[0] = i;
                        sift_down(hv, hi, kk, 0);
                    }
                    thr = hv[0];
                    thr4 = (v4f){thr, thr, thr, thr};
                }
            }
        }
        if (bad || size < kk) continue;
        for (int64_t s = kk - 1; s > 0; s--) { /* heap sort: the minimum to the end, so descending */
            float v = hv[0];
            int64_t x = hi[0];
            hv[0] = hv[s];
            hi[0] = hi[s];
            hv[s] = v;
            hi[s] = x;
            sift_down(hv, hi, s, 0);
        }
        ok[r] = (uint8_t)emit_if_unique(hv, hi, kk, out + r * k);
    }
    free(hv);
    free(hi);
    free(cmax);
    return 0;
}

/* ---- Streaming: the masked top-k of rows that arrive in column tiles (scores computed tile by tile) ----
 *
 * Each row keeps a buffer of up to CAPACITY (k + 1) candidates (value, column) and a threshold thr (-inf at first): a
 * tile's scores above thr are looked up in the row's masked columns and appended; a full buffer is cut to its
 * k + 1 best (Hoare's selection) and thr becomes the smallest of them. Every score that can be among the row's
 * k + 1 best is above thr when it arrives, or equal to it (then a tie at the (k+1)-th place, which does not decide
 * the top k), so the buffer ends holding the row's k + 1 best. dprec_topk_finish then decides the rows as
 * dprec_masked_topk_f32 does. An unmasked NaN marks the row bad (left to the caller).
 *
 * Tile column j is the row's column columns[col0 + j] (NULL: col0 + j): the columns may come in any order (the
 * caller sends the items of large norm first, so that the threshold rises early). State per row r:
 * cv[r * cap .. + cap), ci[...] with cap = dprec_topk_capacity(k), count[r], thr[r], bad[r]: the caller allocates
 * it and sets count 0, thr -inf, bad 0.
 */

#define CAPACITY 2

/* Candidates kept per row by the streaming functions: CAPACITY (k + 1). */
int64_t dprec_topk_capacity(int64_t k) { return CAPACITY * (k + 1); }


int64_t dprec_topk_feed_f32(const float *tile, int64_t b, int64_t t, int64_t col0, int64_t n, const int64_t *columns,
                            const int64_t *mrows, const int64_t *mcols, int64_t m, int64_t k, float *cv, int64_t *ci,
                            int64_t *count,
                            float *thr, uint8_t *bad) {
    int64_t kk = k + 1, cap = CAPACITY * kk;
    if (k < 1 || kk > n || col0 < 0 || col0 + t > n) return -3;
    int64_t pairs = check_pairs(mrows, mcols, m, b, n);
    if (pairs) return pairs;
    int64_t p = 0;
    for (int64_t r = 0; r < b; r++) {
        const float *row = tile + r * t;
        int64_t p0 = p;
        while (p < m && mrows[p] == r) p++;
        if (bad[r]) continue;
        const int64_t *mc = mcols + p0;
        int64_t nm = p - p0, c = count[r];
        float th = thr[r];
        float *v = cv + r * cap;
        int64_t *ix = ci + r * cap;
        v4f th4 = {th, th, th, th};
        for (int64_t j = 0; j < t && !bad[r]; j += 4) {
            int64_t lanes = j + 4 <= t ? 4 : t - j;
            if (lanes == 4 && !any4(~(load4(row + j) <= th4))) continue;
            for (int64_t i = j; i < j + lanes; i++) {
                float x = row[i];
                if (x <= th) continue;
                int64_t col = columns ? columns[col0 + i] : col0 + i;
                if (is_masked(mc, nm, col)) continue;
                if (x != x) {
                    bad[r] = 1;
                    break;
                }
                v[c] = x;
                ix[c] = col;
                if (++c == cap) { /* keep the k + 1 best; the threshold rises to the smallest of them */
                    select_largest(v, ix, c, kk);
                    c = kk;
                    th = v[kk - 1];
                    th4 = (v4f){th, th, th, th};
                }
            }
        }
        count[r] = c;
        thr[r] = th;
    }
    return 0;
}

int64_t dprec_topk_finish(int64_t b, int64_t k, float *cv, int64_t *ci, const int64_t *count, const uint8_t *bad,
                          int64_t *out, uint8_t *ok) {
    int64_t kk = k + 1, cap = CAPACITY * kk;
    if (k < 1) return -3;
    for (int64_t r = 0; r < b; r++) {
        float *v = cv + r * cap;
        int64_t *ix = ci + r * cap;
        int64_t c = count[r];
        ok[r] = 0;
        if (bad[r] || c < kk) continue;
        if (c > kk) select_largest(v, ix, c, kk);
        for (int64_t i = 1; i < kk; i++) { /* insertion sort, descending */
            float x = v[i];
            int64_t y = ix[i];
            int64_t j = i;
            while (j > 0 && v[j - 1] < x) {
                v[j] = v[j - 1];
                ix[j] = ix[j - 1];
                j--;
            }
            v[j] = x;
            ix[j] = y;
        }
        ok[r] = (uint8_t)emit_if_unique(v, ix, kk, out + r * k);
    }
    return 0;
}
