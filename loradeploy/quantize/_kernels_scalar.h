/*
 * The scalar path of _kernels.c: ggml's reference quantizers for Q4_K, Q5_K and Q6_K restated one
 * sub-block at a time, with the same float operations in the same order. It is what runs where the
 * compiler has no generic vectors, and the yardstick the vector path is tested against.
 * Included only by _kernels.c, after its helpers.
 */
/* ------------------------------------------------- Q4_K / Q5_K: 8 sub-blocks of 32 side by side */

#define NS 8    /* sub-blocks per super-block */
#define SL 32   /* values per sub-block */

/* One super-block's scale/min search (ggml's make_qkx2_quants with av_x + |x| weights), all eight
 * sub-blocks at once. X[i][j] is value i of sub-block j. Outputs L[i][j], scale[j], min[j] (>= 0). */
static void qkx2_8(const float X[SL][NS], int nmax, float rmin, float rdelta, int nstep,
                   uint8_t L[SL][NS], float scale_out[NS], float min_out[NS]) {
    float W[SL][NS];
    float sx2[NS], avx[NS], mn[NS], mx[NS], sw[NS], sx[NS];
    float scale[NS], best[NS], lo0[NS];
    uint8_t La[SL][NS];

    for (int j = 0; j < NS; ++j) sx2[j] = 0.0f;
    for (int i = 0; i < SL; ++i)
        for (int j = 0; j < NS; ++j) sx2[j] += X[i][j] * X[i][j];
    for (int j = 0; j < NS; ++j) avx[j] = sqrtf(sx2[j] / 32.0f);
    for (int i = 0; i < SL; ++i)
        for (int j = 0; j < NS; ++j) W[i][j] = avx[j] + fabsf(X[i][j]);

    for (int j = 0; j < NS; ++j) {
        mn[j] = X[0][j]; mx[j] = X[0][j]; sw[j] = W[0][j]; sx[j] = sw[j] * X[0][j];
    }
    for (int i = 1; i < SL; ++i)
        for (int j = 0; j < NS; ++j) {
            const float v = X[i][j], w = W[i][j];
            mn[j] = v < mn[j] ? v : mn[j];
            mx[j] = v > mx[j] ? v : mx[j];
            sw[j] += w;
            sx[j] += w * v;
        }
    for (int j = 0; j < NS; ++j) { mn[j] = mn[j] > 0.0f ? 0.0f : mn[j]; lo0[j] = mn[j]; }

    /* first guess: the plain min/max grid */
    float isc[NS];
    for (int j = 0; j < NS; ++j) { isc[j] = (float)nmax / (mx[j] - mn[j]); scale[j] = 1.0f / isc[j]; best[j] = 0.0f; }
    for (int i = 0; i < SL; ++i)
        for (int j = 0; j < NS; ++j) {
            int l = nearest(isc[j] * (X[i][j] - mn[j]));
            l = l < 0 ? 0 : (l > nmax ? nmax : l);
            L[i][j] = (uint8_t)l;
            float diff = scale[j] * (float)l + mn[j] - X[i][j];
            best[j] += W[i][j] * (diff * diff);
        }

    for (int is = 0; is <= nstep; ++is) {
        const float num = rmin + rdelta * (float)is + (float)nmax;
        float sl[NS], sl2[NS], sxl[NS], tsc[NS], tmn[NS], cur[NS];
        int ok[NS];
        for (int j = 0; j < NS; ++j) { isc[j] = num / (mx[j] - mn[j]); sl[j] = sl2[j] = sxl[j] = 0.0f; }
        for (int i = 0; i < SL; ++i)
            for (int j = 0; j < NS; ++j) {
                int l = nearest(isc[j] * (X[i][j] - mn[j]));
                l = l < 0 ? 0 : (l > nmax ? nmax : l);
                La[i][j] = (uint8_t)l;
                const float w = W[i][j], fl = (float)l;
                sl[j] += w * fl;
                sl2[j] += w * fl * fl;
                sxl[j] += w * fl * X[i][j];
            }
        for (int j = 0; j < NS; ++j) {
            const float D = sw[j] * sl2[j] - sl[j] * sl[j];
            ok[j] = D > 0.0f;
            float s = (sw[j] * sxl[j] - sx[j] * sl[j]) / D;
            float m = (sl2[j] * sx[j] - sl[j] * sxl[j]) / D;
            if (m > 0.0f) { m = 0.0f; s = sxl[j] / sl2[j]; }
            tsc[j] = s; tmn[j] = m; cur[j] = 0.0f;
        }
        for (int i = 0; i < SL; ++i)
            for (int j = 0; j < NS; ++j) {
                float diff = tsc[j] * (float)La[i][j] + tmn[j] - X[i][j];
                cur[j] += W[i][j] * (diff * diff);
            }
        int any = 0;
        for (int j = 0; j < NS; ++j) {
            ok[j] = ok[j] && cur[j] < best[j];
            if (ok[j]) { best[j] = cur[j]; scale[j] = tsc[j]; mn[j] = tmn[j]; any = 1; }
        }
        if (any)
            for (int i = 0; i < SL; ++i)
                for (int j = 0; j < NS; ++j)
                    if (ok[j]) L[i][j] = La[i][j];
    }
    for (int j = 0; j < NS; ++j) {
        if (mx[j] == lo0[j]) {          /* constant sub-block: ggml returns before any search */
            for (int i = 0; i < SL; ++i) L[i][j] = 0;
            scale_out[j] = 0.0f;
            min_out[j] = -lo0[j];
        } else {
            scale_out[j] = scale[j];
            min_out[j] = -mn[j];
        }
    }
}

/* Shared tail of Q4_K and Q5_K: 6-bit scales and mins, the two super-block halves, final levels. */
static void k_scales(const float X[SL][NS], const float sc[NS], const float mi[NS], int nmax,
                     uint8_t *dhead, uint8_t scales[12], uint8_t L[SL][NS]) {
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < NS; ++j) {
        if (sc[j] > max_scale) max_scale = sc[j];
        if (mi[j] > max_min) max_min = mi[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[NS], lm[NS];
    memset(scales, 0, 12);
    for (int j = 0; j < NS; ++j) {
        uint8_t a = (uint8_t)nearest(inv_scale * sc[j]);   /* the uint8 wrap is ggml's too */
        uint8_t b = (uint8_t)nearest(inv_min * mi[j]);
        ls[j] = a < 63 ? a : 63;
        lm[j] = b < 63 ? b : 63;
        if (j < 4) {
            scales[j] = ls[j];
            scales[j + 4] = lm[j];
        } else {
            scales[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            scales[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            scales[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
    const uint16_t hd = to_half(max_scale / 63.f), hm = to_half(max_min / 63.f);
    put_half(dhead, hd);
    put_half(dhead + 2, hm);
    const float fd = from_half(hd), fm = from_half(hm);
    float d[NS], dm[NS];
    for (int j = 0; j < NS; ++j) { d[j] = fd * (float)ls[j]; dm[j] = fm * (float)lm[j]; }
    for (int i = 0; i < SL; ++i)
        for (int j = 0; j < NS; ++j) {
            if (d[j] == 0.0f) continue;    /* ggml keeps the search's levels there */
            int l = nearest((X[i][j] + dm[j]) / d[j]);
            L[i][j] = (uint8_t)(l < 0 ? 0 : (l > nmax ? nmax : l));
        }
}

static void load8(const float *x, float X[SL][NS]) {
    for (int j = 0; j < NS; ++j)
        for (int i = 0; i < SL; ++i) X[i][j] = x[SL * j + i];
}

static void q4_K_rows(const float *x, uint8_t *y, int64_t n) {
    float X[SL][NS], sc[NS], mi[NS];
    uint8_t L[SL][NS];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 144) {
        load8(x, X);
        qkx2_8(X, 15, -1.f, 0.1f, 20, L, sc, mi);
        k_scales(X, sc, mi, 15, y, y + 4, L);
        uint8_t *q = y + 16;
        for (int p = 0; p < 4; ++p, q += 32)     /* sub-blocks 2p and 2p+1 share 32 bytes */
            for (int i = 0; i < SL; ++i) q[i] = (uint8_t)(L[i][2 * p] | (L[i][2 * p + 1] << 4));
    }
}

static void q5_K_rows(const float *x, uint8_t *y, int64_t n) {
    float X[SL][NS], sc[NS], mi[NS];
    uint8_t L[SL][NS];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 176) {
        load8(x, X);
        qkx2_8(X, 31, -0.5f, 0.1f, 15, L, sc, mi);
        k_scales(X, sc, mi, 31, y, y + 4, L);
        uint8_t *qh = y + 16, *ql = y + 48;
        memset(qh, 0, 32);
        for (int p = 0; p < 4; ++p, ql += 32) {
            const uint8_t m1 = (uint8_t)(1u << (2 * p)), m2 = (uint8_t)(2u << (2 * p));
            for (int i = 0; i < SL; ++i) {
                int l1 = L[i][2 * p], l2 = L[i][2 * p + 1];
                if (l1 > 15) { l1 -= 16; qh[i] |= m1; }
                if (l2 > 15) { l2 -= 16; qh[i] |= m2; }
                ql[i] = (uint8_t)(l1 | (l2 << 4));
            }
        }
    }
}

/* ------------------------------------------------- Q6_K: 16 sub-blocks of 16 side by side */

#define N6 16

/* ggml's make_qx_quants(16, 32, x, L, rmse_type = 1, no weights) for all sixteen sub-blocks. */
static void qx_16(const float X[N6][N6], int8_t L[N6][N6], float out[N6]) {
    const int nmax = 32;
    float amax[N6], mx[N6], isc[N6], slx[N6], sl2[N6], scale[N6], best[N6];
    for (int j = 0; j < N6; ++j) { amax[j] = 0.0f; mx[j] = 0.0f; }
    for (int i = 0; i < N6; ++i)
        for (int j = 0; j < N6; ++j) {
            const float a = fabsf(X[i][j]);
            if (a > amax[j]) { amax[j] = a; mx[j] = X[i][j]; }
        }
    for (int j = 0; j < N6; ++j) { isc[j] = (float)(-nmax) / mx[j]; slx[j] = sl2[j] = 0.0f; }
    for (int i = 0; i < N6; ++i)
        for (int j = 0; j < N6; ++j) {
            int l = nearest(isc[j] * X[i][j]);
            l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
            L[i][j] = (int8_t)(l + nmax);
            const float v = X[i][j], w = v * v, fl = (float)l;
            slx[j] += w * v * fl;
            sl2[j] += w * fl * fl;
        }
    for (int j = 0; j < N6; ++j) {
        scale[j] = sl2[j] != 0.0f ? slx[j] / sl2[j] : 0.0f;
        best[j] = scale[j] * slx[j];
    }
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        int ok[N6], any = 0;
        for (int j = 0; j < N6; ++j) { isc[j] = -((float)nmax + 0.1f * (float)is) / mx[j]; slx[j] = sl2[j] = 0.0f; }
        for (int i = 0; i < N6; ++i)
            for (int j = 0; j < N6; ++j) {
                int l = nearest(isc[j] * X[i][j]);
                l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
                const float v = X[i][j], w = v * v, fl = (float)l;
                slx[j] += w * v * fl;
                sl2[j] += w * fl * fl;
            }
        for (int j = 0; j < N6; ++j) {
            ok[j] = sl2[j] > 0.0f && slx[j] * slx[j] > best[j] * sl2[j];
            if (ok[j]) { scale[j] = slx[j] / sl2[j]; best[j] = scale[j] * slx[j]; any = 1; }
        }
        if (any)
            for (int i = 0; i < N6; ++i)
                for (int j = 0; j < N6; ++j)
                    if (ok[j]) {
                        int l = nearest(isc[j] * X[i][j]);
                        l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
                        L[i][j] = (int8_t)(l + nmax);
                    }
    }
    for (int j = 0; j < N6; ++j) {
        if (amax[j] < EPS_GROUP) {      /* all (near) zero: ggml returns early with zero levels */
            for (int i = 0; i < N6; ++i) L[i][j] = 0;
            out[j] = 0.0f;
        } else {
            out[j] = scale[j];
        }
    }
}

static void q6_K_rows(const float *x, uint8_t *y, int64_t n) {
    float X[N6][N6], sc[N6];
    int8_t L[N6][N6];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 210) {
        for (int j = 0; j < N6; ++j)
            for (int i = 0; i < N6; ++i) X[i][j] = x[N6 * j + i];
        qx_16(X, L, sc);
        float max_scale = 0.0f, max_abs = 0.0f;
        for (int j = 0; j < N6; ++j) {
            const float a = fabsf(sc[j]);
            if (a > max_abs) { max_abs = a; max_scale = sc[j]; }
        }
        uint8_t *ql = y, *qh = y + 128;
        int8_t *scales = (int8_t *)(y + 192);
        if (max_abs < EPS_GROUP) {
            memset(y, 0, 210);
            continue;
        }
        const float iscale = -128.f / max_scale;
        const uint16_t hd = to_half(1.0f / iscale);
        put_half(y + 208, hd);
        const float fd = from_half(hd);
        float d[N6];
        for (int j = 0; j < N6; ++j) {
            const int s = nearest(iscale * sc[j]);
            scales[j] = (int8_t)(s < 127 ? s : 127);
            d[j] = fd * (float)scales[j];
        }
        for (int i = 0; i < N6; ++i)
            for (int j = 0; j < N6; ++j) {
                if (d[j] == 0.0f) continue;
                int l = nearest(X[i][j] / d[j]);
                l = l < -32 ? -32 : (l > 31 ? 31 : l);
                L[i][j] = (int8_t)(l + 32);
            }
        /* value k of the block is L[k % 16][k / 16]; two 128-value halves, four 32-value quarters */
#define LV(k) ((uint8_t)L[(k) % N6][(k) / N6])
        for (int h = 0; h < 2; ++h, ql += 64, qh += 32) {
            const int base = 128 * h;
            for (int l = 0; l < 32; ++l) {
                const uint8_t a = LV(base + l), b = LV(base + l + 32), c = LV(base + l + 64), e = LV(base + l + 96);
                ql[l] = (uint8_t)((a & 0xF) | ((c & 0xF) << 4));
                ql[l + 32] = (uint8_t)((b & 0xF) | ((e & 0xF) << 4));
                qh[l] = (uint8_t)((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6));
            }
        }
#undef LV
    }
}
