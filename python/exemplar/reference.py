"""The truth: every score of DESIGN.md §1-§2 computed the slow, obvious way in
float64, with explicit per-example gradients and an explicit (C*Dp, C*Dp)
inverse curvature. Tests compare the kernels to this; bench/ uses it as the
naive baseline. Nothing here is clever on purpose, and nothing here calls the
extension."""
from __future__ import annotations

import math

import torch

def augment(features: torch.Tensor, bias: bool) -> torch.Tensor:
    phi = features.double()
    if bias:
        phi = torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=phi.dtype)], dim=1)
    return phi


def per_example_grads(features, logits, labels, bias: bool) -> torch.Tensor:
    """(N, C*Dp): g_i = vec((p_i - e_{y_i}) phi_i^T), row-major."""
    phi = augment(features, bias)
    p = torch.softmax(logits.double(), dim=1)
    grads = []
    for i in range(phi.shape[0]):
        r = p[i].clone()
        r[labels[i]] -= 1.0
        grads.append(torch.outer(r, phi[i]).reshape(-1))
    return torch.stack(grads)


def output_hessians(logits) -> torch.Tensor:
    """(N, C, C): Lambda_i = diag(p_i) - p_i p_i^T."""
    p = torch.softmax(logits.double(), dim=1)
    return torch.stack([torch.diag(pi) - torch.outer(pi, pi) for pi in p])


def exact_hessian(features, logits, bias: bool) -> torch.Tensor:
    phi = augment(features, bias)
    lams = output_hessians(logits)
    H = 0
    for i in range(phi.shape[0]):
        H = H + torch.kron(lams[i], torch.outer(phi[i], phi[i]))
    return H / phi.shape[0]


def kfac_factors(features, logits, bias: bool):
    phi = augment(features, bias)
    lams = output_hessians(logits)
    A = sum(torch.outer(f, f) for f in phi) / phi.shape[0]
    G = lams.sum(0) / phi.shape[0]
    return A, G


def inverse_curvature(features, logits, curvature: str, damping: float, bias: bool,
                      kfac_damping: str = "eigenbasis") -> torch.Tensor:
    """The explicit damped inverse, (C*Dp, C*Dp)."""
    C = logits.shape[1]
    Dp = features.shape[1] + int(bias)
    if curvature == "identity":
        return torch.eye(C * Dp, dtype=torch.float64) / (damping if damping > 0 else 1.0)
    if curvature == "exact":
        H = exact_hessian(features, logits, bias)
        return torch.linalg.inv(H + damping * torch.eye(C * Dp, dtype=torch.float64))
    A, G = kfac_factors(features, logits, bias)
    if curvature == "kfac" and kfac_damping == "factored":
        pi = math.sqrt((torch.trace(G) / C) / (torch.trace(A) / Dp))
        sq = math.sqrt(damping)
        return torch.kron(torch.linalg.inv(G + pi * sq * torch.eye(C, dtype=torch.float64)),
                          torch.linalg.inv(A + sq / pi * torch.eye(Dp, dtype=torch.float64)))
    sG, QG = torch.linalg.eigh(G)
    sA, QA = torch.linalg.eigh(A)
    if curvature == "kfac":
        eig = torch.kron(sG, sA)
    elif curvature == "ekfac":
        phi = augment(features, bias)
        lams = output_hessians(logits)
        eig = 0
        for i in range(phi.shape[0]):
            eig = eig + torch.kron(torch.diag(QG.T @ lams[i] @ QG), (QA.T @ phi[i]) ** 2)
        eig = eig / phi.shape[0]
    else:
        raise ValueError(curvature)
    K = torch.kron(QG, QA)
    return K @ torch.diag(1.0 / (eig + damping)) @ K.T


def scores(train_features, train_logits, train_labels, test_features, test_logits, test_labels,
           method: str, curvature: str = "exact", damping: float = 1e-3, bias: bool = True,
           kfac_damping: str = "eigenbasis") -> torch.Tensor:
    """(T, N) scores, every one from explicit gradients and the explicit inverse."""
    g_train = per_example_grads(train_features, train_logits, train_labels, bias)
    g_test = per_example_grads(test_features, test_logits, test_labels, bias)
    if method == "grad_dot":
        return g_test @ g_train.T
    if method == "grad_cos":
        return (g_test @ g_train.T) / torch.outer(g_test.norm(dim=1), g_train.norm(dim=1))
    Hinv = inverse_curvature(train_features, train_logits, curvature, damping, bias, kfac_damping)
    influence = g_test @ Hinv @ g_train.T
    if method == "if":
        return influence
    if method == "theta_relatif":
        return influence / (g_train @ Hinv).norm(dim=1)
    if method == "l_relatif":
        return influence / torch.sqrt(((g_train @ Hinv) * g_train).sum(dim=1))
    raise ValueError(method)


def self_influence(features, logits, labels, method: str, **kw) -> torch.Tensor:
    """(N,): the diagonal of the full train x train score matrix."""
    return torch.diagonal(scores(features, logits, labels, features, logits, labels, method, **kw))
