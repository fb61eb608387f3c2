"""What exemplar's score ops are measured against.

naive: reference.py's way — explicit (N, C*Dp) per-example gradients in
float64 and the explicit (C*Dp, C*Dp) inverse curvature.
chunked: the best plain-PyTorch code we could write — the training set in
chunks, per-example gradients of a chunk built with one broadcast multiply,
one GEMM against the flattened test operators, torch.topk per chunk and a
running merge. Nothing (T, N)-sized in its top-k variant."""
from __future__ import annotations

import torch


def naive_scores(s, r, phi, inv_norm):
    """Explicit float64 per-example gradients, one (T, C*Dp) x (C*Dp, N) product."""
    g_train = (r.double().unsqueeze(2) * phi.double().unsqueeze(1)).reshape(r.shape[0], -1)
    return (s.double().reshape(s.shape[0], -1) @ g_train.T) * inv_norm.double()


def _chunk_scores_general(s_flat, r, phi, inv_norm, n0, n):
    g = ((r[n0:n0 + n] * inv_norm[n0:n0 + n, None]).unsqueeze(2) * phi[n0:n0 + n].unsqueeze(1))
    return s_flat @ g.reshape(n, -1).T


def _chunk_scores_rank1(alpha, beta, r, phi, inv_norm, n0, n):
    return (alpha @ (r[n0:n0 + n] * inv_norm[n0:n0 + n, None]).T) * (beta @ phi[n0:n0 + n].T)


def _chunked(score_chunk, T, N, k, largest, chunk, device, dtype):
    if k is None:
        out = torch.empty(T, N, dtype=dtype, device=device)
        for n0 in range(0, N, chunk):
            n = min(chunk, N - n0)
            out[:, n0:n0 + n] = score_chunk(n0, n)
        return out
    best_v = best_i = None
    for n0 in range(0, N, chunk):
        n = min(chunk, N - n0)
        v, i = torch.topk(score_chunk(n0, n), min(k, n), dim=1, largest=largest)
        i += n0
        if best_v is not None:
            v, j = torch.topk(torch.cat([best_v, v], 1), k if best_v.shape[1] + v.shape[1] >= k
                              else best_v.shape[1] + v.shape[1], dim=1, largest=largest)
            i = torch.gather(torch.cat([best_i, i], 1), 1, j)
        best_v, best_i = v, i
    return best_v, best_i


def chunked_general(s, r, phi, inv_norm, k=None, largest=True, chunk=1024):
    s_flat = s.reshape(s.shape[0], -1)
    return _chunked(lambda n0, n: _chunk_scores_general(s_flat, r, phi, inv_norm, n0, n),
                    s.shape[0], r.shape[0], k, largest, chunk, s.device, s.dtype)


def chunked_rank1(alpha, beta, r, phi, inv_norm, k=None, largest=True, chunk=8192):
    return _chunked(lambda n0, n: _chunk_scores_rank1(alpha, beta, r, phi, inv_norm, n0, n),
                    alpha.shape[0], r.shape[0], k, largest, chunk, alpha.device, alpha.dtype)



def closed_form_exact(features, logits, labels, test_features, test_logits, k, method="if", damping=1e-3,
                      chunk=2048):
    """Exact influence (if, theta_relatif, l_relatif) top-k for the predicted
    class, the whole call, written the way a strong engineer would in plain
    PyTorch: H from its C(C+1)/2 Gram blocks (GEMMs in the data's dtype per
    chunk, float64 across chunks), Cholesky, the test gradients solved for,
    RelatIF's normalisers from the explicit inverse chunk by chunk, and the
    scores by chunked GEMM + top-k merge."""
    N, D = features.shape
    C, Dp, dtype = logits.shape[1], D + 1, features.dtype
    n = C * Dp
    phi = torch.cat([features, features.new_ones(N, 1)], 1)
    H = torch.zeros(n, n, dtype=torch.float64)
    for n0 in range(0, N, chunk):
        f = phi[n0:n0 + chunk]
        p = torch.softmax(logits[n0:n0 + chunk].double(), 1)
        for c in range(C):
            for c2 in range(c, C):
                w = (p[:, c] * (float(c == c2) - p[:, c2])).to(dtype)
                H[c * Dp:(c + 1) * Dp, c2 * Dp:(c2 + 1) * Dp] += ((f * w[:, None]).T @ f).double()
    for c in range(C):
        for c2 in range(c + 1, C):
            H[c2 * Dp:(c2 + 1) * Dp, c * Dp:(c + 1) * Dp] = H[c * Dp:(c + 1) * Dp, c2 * Dp:(c2 + 1) * Dp].T
    H /= N
    H.diagonal().add_(damping)
    L = torch.linalg.cholesky(H)
    del H
    r = (torch.softmax(logits.double(), 1) - torch.nn.functional.one_hot(labels, C)).to(dtype)
    T = test_features.shape[0]
    phi_t = torch.cat([test_features, test_features.new_ones(T, 1)], 1)
    r_t = torch.softmax(test_logits.double(), 1) - torch.nn.functional.one_hot(test_logits.argmax(1), C)
    g_t = (r_t[:, :, None] * phi_t.double()[:, None, :]).reshape(T, n)
    S = torch.cholesky_solve(g_t.T, L).T.to(dtype).reshape(T, C, Dp)
    inv_norm = torch.ones(N, dtype=dtype)
    if method != "if":
        hinv = torch.cholesky_inverse(L).to(dtype)
        for n0 in range(0, N, chunk):
            g = (r[n0:n0 + chunk, :, None] * phi[n0:n0 + chunk, None, :]).reshape(-1, n)
            y = g @ hinv
            norm = (y * y).sum(1) if method == "theta_relatif" else (y * g).sum(1)
            inv_norm[n0:n0 + chunk] = norm.clamp_min(0).sqrt().reciprocal()
    return chunked_general(S, r, phi, inv_norm, k=k)
