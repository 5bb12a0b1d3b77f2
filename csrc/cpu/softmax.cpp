// CPU backend of the softmax family: one pass per row (N, C) row-major; max subtracted before exp, the row
// sum accumulated in double in increasing class order.
#include <cmath>

#include "ops.h"

namespace ax {
namespace cpu {

namespace {

// probs row = softmax(row); returns log(sum exp(row - max)) and stores the max in *row_max.
double softmax_row(int C, const float* __restrict row, float* __restrict probs, float* row_max) {
    float m = row[0];
    for (int c = 1; c < C; ++c) m = row[c] > m ? row[c] : m;
    double sum = 0.0;
    for (int c = 0; c < C; ++c) {
        const float e = std::exp(row[c] - m);
        probs[c] = e;
        sum += e;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int c = 0; c < C; ++c) probs[c] *= inv;
    *row_max = m;
    return std::log(sum);
}

}  // namespace

// loss = log(sum exp(z - max)) - (z[label] - max); rank = classes beating the label (ties: lower index wins).
void softmax_cross_entropy_forward(const SoftmaxParams& p, const float* logits, const int32_t* labels, float* loss,
                                   float* probs, int32_t* rank) {
    for (int n = 0; n < p.N; ++n) {
        const float* row = logits + static_cast<int64_t>(n) * p.C;
        float m;
        const double log_sum = softmax_row(p.C, row, probs + static_cast<int64_t>(n) * p.C, &m);
        const int label = labels[n];
        const float z = row[label];
        loss[n] = static_cast<float>(log_sum - static_cast<double>(z - m));
        int32_t beaten_by = 0;
        for (int c = 0; c < p.C; ++c) beaten_by += (row[c] > z) || (row[c] == z && c < label);
        rank[n] = beaten_by;
    }
}

// dlogits = (probs - onehot(label)) * scale.
void softmax_cross_entropy_backward(const SoftmaxParams& p, const float* probs, const int32_t* labels, float scale,
                                    float* dlogits) {
    for (int n = 0; n < p.N; ++n) {
        const float* __restrict pr = probs + static_cast<int64_t>(n) * p.C;
        float* __restrict d = dlogits + static_cast<int64_t>(n) * p.C;
        for (int c = 0; c < p.C; ++c) d[c] = pr[c] * scale;
        d[labels[n]] = (pr[labels[n]] - 1.0f) * scale;
    }
}

void softmax_forward(const SoftmaxParams& p, const float* logits, float* probs) {
    for (int n = 0; n < p.N; ++n) {
        float m;
        softmax_row(p.C, logits + static_cast<int64_t>(n) * p.C, probs + static_cast<int64_t>(n) * p.C, &m);
    }
}

}  // namespace cpu
}  // namespace ax
