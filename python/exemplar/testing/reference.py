"""The truth: every score of docs/design.md §1-§2 computed the slow, obvious way in
float64, with explicit per-example gradients and an explicit (C*Dp, C*Dp)
inverse curvature. Tests compare the kernels to this; bench/ uses it as the
naive baseline. Nothing here is clever on purpose, and nothing here calls the
extension."""
from __future__ import annotations

import math

import torch


def augment(features: torch.Tensor, bias: bool) -> torch.Tensor:
    """features (n, D) float64 with a column of ones when `bias`."""
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
    """The mean Gauss-Newton Hessian (C*Dp, C*Dp), float64, from explicit per-example blocks."""
    phi = augment(features, bias)
    lams = output_hessians(logits)
    H = 0
    for i in range(phi.shape[0]):
        H = H + torch.kron(lams[i], torch.outer(phi[i], phi[i]))
    return H / phi.shape[0]


def kfac_factors(features, logits, bias: bool):
    """(A = mean phi phi^T (Dp, Dp), G = mean Lambda_i (C, C)), float64."""
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


def knn_scores(train_features, test_features) -> torch.Tensor:
    """(T, N): -|phi_t - phi_i|^2 on the raw features (no bias column)."""
    diff = test_features.double().unsqueeze(1) - train_features.double().unsqueeze(0)
    return -(diff**2).sum(2)


def rps_l2_alpha(train_features, theta, target_logits, strength: float, bias: bool) -> torch.Tensor:
    """(N, C): Yeh et al.'s representer values -(1/(2 lambda N)) dL/dz_i at the refit theta,
    the soft targets being the model's own probabilities."""
    phi = augment(train_features, bias)
    residual = torch.softmax(phi @ theta.double().T, 1) - torch.softmax(target_logits.double(), 1)
    return -residual / (2.0 * strength * phi.shape[0])


def rps_l2_scores(train_features, alpha, test_features, test_labels, bias: bool) -> torch.Tensor:
    """(T, N): alpha_{i,c} (phi_i . phi_t) for the explained class c of each test."""
    phi, phi_t = augment(train_features, bias), augment(test_features, bias)
    return alpha.double()[:, test_labels].T * (phi_t @ phi.T)


def rps_lje_scores(train_features, train_labels, theta, test_features, test_labels, step: float,
                   curvature: str = "exact", damping: float = 1e-3, bias: bool = True,
                   kfac_damping: str = "eigenbasis") -> torch.Tensor:
    """(T, N): Sui et al. Eq. 11 with explicit gradients and the explicit inverse at
    Theta* = Theta + step * (mean training gradient at Theta)."""
    phi, phi_t = augment(train_features, bias), augment(test_features, bias)
    N, C = phi.shape[0], theta.shape[0]
    grads = per_example_grads(train_features, phi @ theta.double().T, train_labels, bias)
    theta_star = theta.double() + step * grads.mean(0).view(C, -1)
    logits_star = phi @ theta_star.T
    g_star = per_example_grads(train_features, logits_star, train_labels, bias)
    hinv = inverse_curvature(train_features, logits_star, curvature, damping, bias, kfac_damping)
    explained = torch.zeros(len(test_labels), C, dtype=torch.float64)
    explained[torch.arange(len(test_labels)), test_labels] = 1.0
    v = (explained.unsqueeze(2) * phi_t.unsqueeze(1)).reshape(len(test_labels), -1)
    logit = (phi_t @ theta_star.T).gather(1, test_labels.view(-1, 1))
    return logit / N - (v @ hinv @ g_star.T) / N


def divine_objective(influence, kernel, chosen, gamma: float, regularizer: str) -> float:
    """sum_{i in S} I_i + gamma * R(S), each R written out from its definition
    (thesis §6.2) with the K candidates as the ground set D."""
    K = len(influence)
    S = list(chosen)
    total = sum(float(influence[i]) for i in S)
    if regularizer == "sum_redundancy":
        R = float(kernel.sum()) - sum(float(kernel[u, v]) for u in S for v in S)
    elif regularizer == "facility_location":
        R = sum(max(float(kernel[u, v]) for v in S) for u in range(K)) if S else 0.0
    elif regularizer == "mmd":
        R = (2.0 / (K * len(S)) * sum(float(kernel[u, v]) for u in range(K) for v in S)
             - 1.0 / len(S) ** 2 * sum(float(kernel[u, v]) for u in S for v in S)) if S else 0.0
    else:
        raise ValueError(regularizer)
    return total + gamma * R


def divine_greedy(influence, kernel, m: int, gamma: float, regularizer: str) -> list[int]:
    """Brute-force greedy: at each step evaluate the whole objective for every
    remaining candidate and keep the best (ties to the lower index)."""
    chosen: list[int] = []
    for _ in range(m):
        best, best_value = None, -math.inf
        for j in range(len(influence)):
            if j in chosen:
                continue
            value = divine_objective(influence, kernel, chosen + [j], gamma, regularizer)
            if value > best_value:
                best, best_value = j, value
        chosen.append(best)
    return chosen
