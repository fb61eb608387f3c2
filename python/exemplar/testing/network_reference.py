"""The truth for whole-network attribution (docs/design.md §11), the slow,
obvious way in float64: per-example gradients of every layer's [W | b] by
torch.func (vmap of grad, no hooks), each layer's Fisher and its K-FAC /
EK-FAC approximation as explicit (W, W) matrices, and scores as explicit
inner products with explicit inverses. Tests compare NetworkExplainer to
this. Nothing here calls the extension or exemplar's capture."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F


def per_example_gradients(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, output=None,
                           loss=None) -> dict[str, torch.Tensor]:
    """name -> (N, *shape) float64: each example's gradient of its loss with
    respect to every trainable parameter (requires_grad), a tied parameter
    once under its first name. loss(logits (1, C), label (1,)) defaults to
    cross-entropy; output(model's output) picks the logits (default: itself)."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    pick = output or (lambda z: z)
    objective = loss or (lambda z, y: F.cross_entropy(z, y))

    def one(p, xi, yi):
        return objective(pick(functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),))), yi.view(1))

    return vmap(grad(one), (None, 0, 0))(params, x, labels)


def trainable_gradients(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, output=None,
                        loss=None) -> torch.Tensor:
    """(N, P) every trainable parameter's per-example gradient, flattened and joined."""
    g = per_example_gradients(model, x, labels, output, loss)
    return torch.cat([v.flatten(1) for v in g.values()], 1)


def parameter_blocks(model: nn.Module, blocks: list[list[str]], x: torch.Tensor,
                     labels: torch.Tensor) -> list[torch.Tensor]:
    """Per block (N, W): the named parameters' per-example gradients, flattened and joined."""
    g = per_example_gradients(model, x, labels)
    return [torch.cat([g[name].flatten(1) for name in names], 1) for names in blocks]


def layer_gradients(model: nn.Module, layers: list[str], x: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Per layer (N, out, in') float64: each example's gradient of
    -log softmax(model(x_i))_{y_i} with respect to the layer's [W | b]
    (a convolution's kernel flattened to out x (in_channels kh kw))."""
    g = per_example_gradients(model, x, labels)
    out = []
    for name in layers:
        w = g[f"{name}.weight"].flatten(2)
        bias = g.get(f"{name}.bias")
        out.append(w if bias is None else torch.cat([w, bias.unsqueeze(2)], 2))
    return out


def fisher(model: nn.Module, layers: list, x: torch.Tensor, labels: torch.Tensor, kind: str,
           gradients=None) -> list[torch.Tensor]:
    """Per layer the (W, W) Fisher (1/N) sum_i E_c[vec(g_ic) vec(g_ic)^T]: over c ~ softmax
    ("expected", every class weighted by p_ic) or c = y_i ("empirical"). gradients(model,
    layers, x, labels) gives the per-layer gradients: layer_gradients (default), or
    parameter_blocks for blocks of parameters named by their names."""
    gradients = gradients or layer_gradients
    N = len(x)
    if kind == "empirical":
        return [g.flatten(1).T @ g.flatten(1) / N for g in gradients(model, layers, x, labels)]
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)
    total = None
    for c in range(p.shape[1]):
        gs = gradients(model, layers, x, torch.full_like(labels, c))
        parts = [(g.flatten(1) * p[:, c:c + 1]).T @ g.flatten(1) / N for g in gs]
        total = parts if total is None else [t + q for t, q in zip(total, parts)]
    return total


def kronecker_fisher(a: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor, ekfac_grads=None) -> torch.Tensor:
    """One vector-input layer's K-FAC (or EK-FAC) Fisher as an explicit (W, W) matrix.

    a: (N, in') the layer's inputs with the bias column; deltas: (N, C, out)
    the output gradients for each class; weights: (N, C) their weights
    (p_ic). K-FAC: G x A with A = (1/N) sum a a^T, G = (1/N) sum_ic w_ic delta delta^T.
    EK-FAC: the same eigenbasis Q = Q_G x Q_A with eigenvalues
    (1/N) sum_ic w_ic (Q^T vec(delta_ic a_i^T))^2."""
    N = len(a)
    A = a.T @ a / N
    G = torch.einsum("nc,nco,ncp->op", weights, deltas, deltas) / N
    if not ekfac_grads:
        return torch.kron(G, A)
    Q = torch.kron(torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1])
    g = torch.einsum("nco,ni->ncoi", deltas, a).flatten(2)  # (N, C, W)
    eig = torch.einsum("nc,ncw->w", weights, (g @ Q).square()) / N
    return Q @ torch.diag(eig) @ Q.T


def scores(train: list[torch.Tensor], test: list[torch.Tensor], curvatures: list[torch.Tensor] | None,
           damping: float, method: str) -> torch.Tensor:
    """(T, N) summed over layers: g_t^T (F_l + damping I)^-1 g_i ("if"), divided by
    |H^-1 g_i| ("theta_relatif") or sqrt(g_i^T H^-1 g_i) ("l_relatif"); g_t^T g_i
    ("grad_dot"), or the cosine ("grad_cos"). curvatures: per layer (W, W) or None."""
    gi = [g.flatten(1).double() for g in train]
    gt = [g.flatten(1).double() for g in test]
    if method in ("grad_dot", "grad_cos"):
        s = sum(t @ i.T for t, i in zip(gt, gi))
        if method == "grad_cos":
            s = s / torch.outer(sum(t.square().sum(1) for t in gt).sqrt(), sum(i.square().sum(1) for i in gi).sqrt())
        return s
    inverses = [torch.linalg.inv(c + damping * torch.eye(len(c), dtype=torch.float64)) for c in curvatures]
    s = sum(t @ h @ i.T for t, h, i in zip(gt, inverses, gi))
    if method == "theta_relatif":
        s = s / sum((i @ h).square().sum(1) for h, i in zip(inverses, gi)).sqrt()
    elif method == "l_relatif":
        s = s / sum(((i @ h) * i).sum(1) for h, i in zip(inverses, gi)).sqrt()
    return s
