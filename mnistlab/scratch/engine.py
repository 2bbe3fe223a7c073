"""A reverse-mode autodiff engine on numpy arrays: backpropagation with nothing hidden.

Backpropagation is the chain rule plus dynamic programming (the notes). The forward pass keeps
every intermediate array; each op records its inputs and a `_backward` closure written right
below its forward, which turns the gradient of the op's output into gradients of its inputs (one
chain-rule factor per edge). `Tensor.backward()` then visits the graph once, in reverse
topological order, so every node's gradient is computed exactly once and reused by all the paths
through it: that reuse is the dynamic programming, and it is why backward costs about two forwards
instead of growing with the number of paths.

Arrays are float32 unless given as float64 (the gradient checks use float64). Broadcasting works as
in numpy; `_unbroadcast` sums a gradient back down to the shape of the input that was broadcast.
After micrograd (Karpathy), with tensors instead of scalars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

_grad_enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Build no graph inside the block (evaluation): no closures, no kept intermediates."""
    global _grad_enabled
    before, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = before


def _unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum `grad` over the axes numpy broadcast to reach it, so that it has `shape` again."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


def _as_array(x: Any, dtype: Any = None) -> np.ndarray:
    a = np.asarray(x)
    if dtype is not None:
        return a.astype(dtype, copy=False)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


class Tensor:
    """An array, its gradient, and how it was made (parents + backward closure)."""

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "op")
    __array_priority__ = 100  # numpy array op Tensor -> Tensor's reflected method

    def __init__(self, data: Any, requires_grad: bool = False, _parents: tuple[Tensor, ...] = (), op: str = ""):
        self.data: np.ndarray = _as_array(data)
        self.grad: np.ndarray | None = None
        self.requires_grad = requires_grad
        self._parents = _parents
        self._backward = None
        self.op = op

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, op={self.op or 'leaf'}, requires_grad={self.requires_grad})"

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return float(self.data)

    def detach(self) -> Tensor:
        return Tensor(self.data)

    def _result(self, data: np.ndarray, parents: tuple[Tensor, ...], op: str) -> Tensor:
        """The output of an op; it joins the graph only if some input needs a gradient."""
        needs = _grad_enabled and any(p.requires_grad for p in parents)
        return Tensor(data, needs, parents if needs else (), op)

    def _accumulate(self, g: np.ndarray) -> None:
        # a node used twice receives the sum of both paths' gradients (the multivariate chain rule)
        if self.requires_grad:
            g = _unbroadcast(g, self.shape).astype(self.data.dtype, copy=False)
            self.grad = g.copy() if self.grad is None else self.grad + g

    def backward(self, grad: np.ndarray | None = None) -> None:
        """Fill .grad of every tensor this one depends on; `grad` defaults to 1 for a scalar."""
        if grad is None:
            if self.data.size != 1:
                raise ValueError("backward() without a gradient needs a scalar (one-element) tensor")
            grad = np.ones_like(self.data)
        order: list[Tensor] = []  # topological: every node after all of its parents
        seen: set[int] = set()
        stack: list[tuple[Tensor, bool]] = [(self, False)]
        while stack:  # iterative depth-first search: deep graphs must not hit the recursion limit
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if id(p) not in seen)
        self.grad = _as_array(grad, self.data.dtype)
        for node in reversed(order):  # outputs before inputs: a node's gradient is complete when visited
            if node._backward is not None and node.grad is not None:
                node._backward(node.grad)

    # -- elementwise arithmetic (broadcasting) --------------------------------------------------
    def __add__(self, other: Any) -> Tensor:
        other = as_tensor(other, self.dtype)
        out = self._result(self.data + other.data, (self, other), "add")
        if out.requires_grad:
            def _backward(g):
                self._accumulate(g)
                other._accumulate(g)
            out._backward = _backward
        return out

    def __mul__(self, other: Any) -> Tensor:
        other = as_tensor(other, self.dtype)
        out = self._result(self.data * other.data, (self, other), "mul")
        if out.requires_grad:
            def _backward(g):
                self._accumulate(g * other.data)  # d(ab)/da = b
                other._accumulate(g * self.data)
            out._backward = _backward
        return out

    def __truediv__(self, other: Any) -> Tensor:
        other = as_tensor(other, self.dtype)
        out = self._result(self.data / other.data, (self, other), "div")
        if out.requires_grad:
            def _backward(g):
                self._accumulate(g / other.data)
                other._accumulate(-g * self.data / (other.data * other.data))  # d(a/b)/db = -a/b^2
            out._backward = _backward
        return out

    def __pow__(self, exponent: float) -> Tensor:
        if isinstance(exponent, Tensor):
            raise TypeError("only a constant exponent is supported: use exp(b * log(a)) for a tensor one")
        out = self._result(self.data ** exponent, (self,), "pow")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * exponent * self.data ** (exponent - 1))
        return out

    def __neg__(self) -> Tensor:
        out = self._result(-self.data, (self,), "neg")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(-g)
        return out

    def __sub__(self, other: Any) -> Tensor:
        return self + (-as_tensor(other, self.dtype))

    def __radd__(self, other: Any) -> Tensor:
        return self + other

    def __rmul__(self, other: Any) -> Tensor:
        return self * other

    def __rsub__(self, other: Any) -> Tensor:
        return as_tensor(other, self.dtype) - self

    def __rtruediv__(self, other: Any) -> Tensor:
        return as_tensor(other, self.dtype) / self

    # -- linear algebra -----------------------------------------------------------------------
    def __matmul__(self, other: Any) -> Tensor:
        other = as_tensor(other, self.dtype)
        if self.ndim < 2 or other.ndim < 2:
            raise ValueError("matmul needs arrays of 2 or more dimensions (reshape vectors to (1, n) or (n, 1))")
        out = self._result(self.data @ other.data, (self, other), "matmul")
        if out.requires_grad:
            def _backward(g):
                # C = A B: dA = dC B^T, dB = A^T dC; batch axes that were broadcast are summed by _accumulate
                if self.requires_grad:
                    self._accumulate(g @ np.swapaxes(other.data, -1, -2))
                if other.requires_grad:
                    other._accumulate(np.swapaxes(self.data, -1, -2) @ g)
            out._backward = _backward
        return out

    def transpose(self, *axes: int) -> Tensor:
        axes_t = tuple(axes) if axes else tuple(reversed(range(self.ndim)))
        out = self._result(self.data.transpose(axes_t), (self,), "transpose")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g.transpose(np.argsort(axes_t)))
        return out

    @property
    def T(self) -> Tensor:  # noqa: N802 (numpy's name)
        return self.transpose()

    def reshape(self, *shape: int) -> Tensor:
        new = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        out = self._result(self.data.reshape(new), (self,), "reshape")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g.reshape(self.shape))
        return out

    def __getitem__(self, index: Any) -> Tensor:
        index = index.data if isinstance(index, Tensor) else index
        out = self._result(self.data[index], (self,), "index")
        if out.requires_grad:
            def _backward(g):
                full = np.zeros_like(self.data)
                np.add.at(full, index, g)  # add.at, not +=: a repeated index must receive every share
                self._accumulate(full)
            out._backward = _backward
        return out

    # -- reductions ---------------------------------------------------------------------------
    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        axis_t = _axes(axis, self.ndim)
        out = self._result(self.data.sum(axis=axis_t, keepdims=keepdims), (self,), "sum")
        if out.requires_grad:
            def _backward(g):
                g = g if keepdims else np.expand_dims(g, axis_t)
                self._accumulate(np.broadcast_to(g, self.shape))  # each input added once into the sum
            out._backward = _backward
        return out

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        axis_t = _axes(axis, self.ndim)
        count = int(np.prod([self.shape[a] for a in axis_t]))
        return self.sum(axis_t, keepdims) * (1.0 / count)

    def max(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        axis_t = _axes(axis, self.ndim)
        m = self.data.max(axis=axis_t, keepdims=True)
        out = self._result(m if keepdims else m.squeeze(axis_t), (self,), "max")
        if out.requires_grad:
            def _backward(g):
                # the gradient flows to the maximum; tied maxima share it equally (as torch.amax)
                hit = self.data == m
                g = g if keepdims else np.expand_dims(g, axis_t)
                self._accumulate(hit * (g / hit.sum(axis=axis_t, keepdims=True)))
            out._backward = _backward
        return out

    # -- elementwise functions ------------------------------------------------------------------
    def exp(self) -> Tensor:
        e = np.exp(self.data)
        out = self._result(e, (self,), "exp")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * e)  # (e^x)' = e^x: reuse the forward's value
        return out

    def log(self) -> Tensor:
        out = self._result(np.log(self.data), (self,), "log")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g / self.data)
        return out

    def relu(self) -> Tensor:
        pos = self.data > 0
        out = self._result(np.maximum(self.data, 0), (self,), "relu")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * pos)  # 1 where x > 0, else 0 (also at 0, as torch)
        return out

    def leaky_relu(self, slope: float = 0.01) -> Tensor:
        pos = self.data > 0
        out = self._result(np.where(pos, self.data, self.data * slope), (self,), "leaky_relu")
        if out.requires_grad:
            # derivative 1 or `slope`; at exactly 0 we take the left side, as torch does
            out._backward = lambda g: self._accumulate(np.where(pos, g, g * slope))
        return out

    def sigmoid(self) -> Tensor:
        s = _sigmoid(self.data)
        out = self._result(s, (self,), "sigmoid")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * s * (1 - s))
        return out

    def tanh(self) -> Tensor:
        t = np.tanh(self.data)
        out = self._result(t, (self,), "tanh")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * (1 - t * t))
        return out

    def softplus(self) -> Tensor:
        # log(1 + e^x), computed as max(x, 0) + log1p(e^-|x|) so that large |x| neither overflows nor underflows
        x = self.data
        out = self._result(np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x))), (self,), "softplus")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * _sigmoid(x))  # softplus' = sigmoid (the notes)
        return out

    def gelu(self) -> Tensor:
        # x * Phi(x), Phi the standard normal CDF (Hendrycks & Gimpel 2016), exact erf form as torch's default
        x = self.data
        cdf = 0.5 * (1.0 + _erf(x / np.sqrt(2.0)))
        out = self._result(x * cdf, (self,), "gelu")
        if out.requires_grad:
            pdf = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
            out._backward = lambda g: self._accumulate(g * (cdf + x * pdf))  # product rule
        return out

    def log_softmax(self, axis: int = -1) -> Tensor:
        shifted = self.data - self.data.max(axis=axis, keepdims=True)  # same result, no overflow
        out_data = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        out = self._result(out_data, (self,), "log_softmax")
        if out.requires_grad:
            # y_i = x_i - log sum_j e^x_j: dx = g - softmax(x) * sum(g)
            out._backward = lambda g: self._accumulate(g - np.exp(out_data) * g.sum(axis=axis, keepdims=True))
        return out


def _axes(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # 1 / (1 + e^-x) for x >= 0 and e^x / (1 + e^x) for x < 0: neither branch overflows
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf without scipy: Abramowitz & Stegun 7.1.26 refined to |error| < 1.2e-7 (Numerical Recipes erfc)."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0).astype(x.dtype, copy=False)


def as_tensor(x: Any, dtype: Any = None) -> Tensor:
    """x itself if it is a Tensor, else a constant Tensor (no gradient) holding it."""
    if isinstance(x, Tensor):
        return x
    return Tensor(_as_array(x, dtype if np.ndim(x) == 0 else None))


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """A leaf Tensor (float32 unless `dtype` or a float64 array says otherwise)."""
    return Tensor(_as_array(data, dtype), requires_grad=requires_grad)
