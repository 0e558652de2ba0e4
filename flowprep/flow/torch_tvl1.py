"""TV-L1 optical flow in PyTorch, batched over pairs, on the CPU or a CUDA GPU.

The same algorithm as OpenCV's two solvers, in two variants:

* ``cpu`` (default) follows ``cv::optflow::DualTVL1OpticalFlow``: a pyramid of linear resizes by
  ``scale_step`` (no blur), ``warps`` bicubic warps a scale (Keys a = -0.75, taps outside the
  image count as 0), then up to ``outer_iterations`` x ``inner_iterations`` primal-dual steps,
  a median filter of the flow (5x5) before each outer iteration, stopping when the squared update
  summed over the image falls to ``epsilon^2 x pixels``.
* ``cuda`` follows ``cv::cuda::OpticalFlowDual_TVL1`` (what denseflow and most published Kinetics
  flow used): one loop of up to ``iterations`` steps, no median filter, Keys a = -0.5 with edge
  taps repeated, corner-aligned pyramid resizes, and the error only checked every other step
  once it is near ``epsilon``.

Images stay on OpenCV's 0-255 scale so that ``lambda`` means the same. Every pair of a batch
carries its own stopping state: a pair that has converged is frozen while the others go on, so
a pair's flow does not depend on which pairs it was solved with.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from flowprep.errors import FlowError, OptionError
from flowprep.flow.opencv import (
    TVL1_CUDA_DEFAULTS,
    TVL1_DEFAULTS,
    check_gray_frames,
    merge_params,
)

# Each variant takes the parameters of the OpenCV solver it follows.
VARIANT_DEFAULTS = {"cpu": TVL1_DEFAULTS, "cuda": TVL1_CUDA_DEFAULTS}
# Below this size OpenCV stops adding pyramid levels.
MIN_LEVEL_SIZE = 16
# The steps between checks whether every pair of a batch has stopped (each check waits for the GPU).
STEPS_PER_CHECK = 10


def torch_tvl1_params(params: dict) -> dict:
    """``params`` (with ``variant``) over that variant's defaults, checked as OpenCV's (see
    :func:`~flowprep.flow.opencv.merge_params`); an unknown name is an error."""
    variant = params.get("variant", "cpu")
    if variant not in VARIANT_DEFAULTS:
        raise OptionError(f"unknown TV-L1 variant {variant!r}; choose cpu or cuda", "flow_params")
    merged = merge_params({k: v for k, v in params.items() if k != "variant"}, VARIANT_DEFAULTS[variant], f"TV-L1 (variant {variant})")
    if merged["gamma"] != 0:
        raise OptionError("the torch TV-L1 solves the brightness-constancy model only: gamma must be 0", "flow_params")
    return {"variant": variant, **merged}


def pyramid_sizes(height: int, width: int, nscales: int, scale_step: float) -> list[tuple[int, int]]:
    """``(height, width)`` of each level, finest first, as OpenCV builds them (each level rounded
    from the one above; a level under 16 pixels is dropped and ends the pyramid)."""
    sizes = [(height, width)]
    for _ in range(1, nscales):
        h, w = (round(sizes[-1][0] * scale_step), round(sizes[-1][1] * scale_step))
        if h < MIN_LEVEL_SIZE or w < MIN_LEVEL_SIZE:
            break
        sizes.append((h, w))
    return sizes


def _linear_taps(n_in: int, n_out: int, scale: float, half_pixel: bool, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (lower, upper) and upper weights of a 1-D linear resize, edges clamped."""
    dst = np.arange(n_out, dtype=np.float64)
    src = ((dst + 0.5) * scale - 0.5 if half_pixel else dst * scale).astype(np.float32)
    lower = np.floor(src)
    frac = np.where(src < 0, 0, src - lower).astype(np.float32)
    lower = np.clip(lower, 0, n_in - 1).astype(np.int64)
    frac[lower >= n_in - 1] = 0
    upper = np.minimum(lower + 1, n_in - 1)
    return tuple(torch.from_numpy(a).to(device) for a in (lower, upper, frac))


def resize_linear(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float], half_pixel: bool) -> torch.Tensor:
    """Separable linear resize of ``[N, H, W]`` float32 to ``size``; ``scale`` is source pixels per
    output pixel (y, x). ``half_pixel`` maps pixel centres (OpenCV's CPU ``resize``); otherwise
    output pixel k samples source k x scale (OpenCV CUDA's)."""
    y0, y1, fy = _linear_taps(x.shape[1], size[0], scale[0], half_pixel, x.device)
    x0, x1, fx = _linear_taps(x.shape[2], size[1], scale[1], half_pixel, x.device)
    rows = x[:, y0] * (1 - fy)[:, None] + x[:, y1] * fy[:, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def _cubic_weights(t: torch.Tensor, a: float) -> list[torch.Tensor]:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 from ``floor(pos)``, ``t = pos - floor(pos)``."""
    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((d - 5) * d + 8) * d * a - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def warp_cubic(images: torch.Tensor, flow_x: torch.Tensor, flow_y: torch.Tensor, a: float, zero_border: bool) -> torch.Tensor:
    """Sample ``[N, C, H, W]`` images at ``(x + flow_x, y + flow_y)`` (``[N, H, W]`` pixels) with a
    4x4 cubic kernel of parameter ``a``. Taps outside the image are 0 (``zero_border``, OpenCV's
    ``remap`` default), or the nearest edge pixel with the result divided by the weights' sum
    (OpenCV CUDA's clamped texture and normalisation)."""
    n, c, h, w = images.shape
    gy, gx = torch.meshgrid(torch.arange(h, device=images.device), torch.arange(w, device=images.device), indexing="ij")
    px, py = gx + flow_x, gy + flow_y
    ix, iy = torch.floor(px), torch.floor(py)
    wx, wy = _cubic_weights(px - ix, a), _cubic_weights(py - iy, a)
    ix, iy = ix.long(), iy.long()
    flat = images.reshape(n, c, h * w)
    out = torch.zeros_like(images)
    total = torch.zeros_like(flow_x)
    for j, dy in enumerate(range(-1, 3)):
        ty = iy + dy
        for i, dx in enumerate(range(-1, 3)):
            tx = ix + dx
            weight = wy[j] * wx[i]
            if zero_border:
                weight = weight * ((tx >= 0) & (tx < w) & (ty >= 0) & (ty < h))
            index = (ty.clamp(0, h - 1) * w + tx.clamp(0, w - 1)).reshape(n, 1, h * w).expand(n, c, h * w)
            out += weight[:, None] * torch.gather(flat, 2, index).reshape(n, c, h, w)
            total += weight
    return out if zero_border else out * (1 / total)[:, None]


def centered_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half central differences of ``[N, H, W]``, one-sided (still halved) at the edges."""
    p = F.pad(x[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    return 0.5 * (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]), 0.5 * (p[:, 2:, 1:-1] - p[:, :-2, 1:-1])


def forward_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences of ``[N, H, W]``, 0 on the last column (x) and last row (y)."""
    return F.pad(x[:, :, 1:] - x[:, :, :-1], (0, 1)), F.pad(x[:, 1:] - x[:, :-1], (0, 0, 0, 1))


def divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Backward-difference divergence of the field ``(px, py)``, taken as 0 outside the image
    (the adjoint of :func:`forward_gradient`)."""
    return (px - F.pad(px[:, :, :-1], (1, 0))) + (py - F.pad(py[:, :-1], (0, 0, 1, 0)))


def _batcher_comparators(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort for ``n`` (a power of two) wires: compare-exchange pairs."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def median_network(count: int) -> list[tuple[int, int]]:
    """Compare-exchange pairs that leave the median of ``count`` (odd) wires on wire ``count // 2``:
    a sorting network padded with +inf wires, less every exchange the median does not depend on
    (113 of them for 25 values)."""
    size = 1 << (count - 1).bit_length()
    needed, kept = {count // 2}, []
    # The padding wires hold +inf throughout: the network only ever exchanges them upwards.
    for i, j in reversed([(i, j) for i, j in _batcher_comparators(size) if j < count]):
        if i in needed or j in needed:
            kept.append((i, j))
            needed |= {i, j}
    return kept[::-1]


# Built once, outside the traced code: OpenCV's medianBlur takes 3 or 5 on float images.
MEDIAN_NETWORKS = {3: median_network(9), 5: median_network(25)}


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` x ``size`` median of ``[N, H, W]`` with edge pixels repeated (OpenCV's
    ``medianBlur``, which takes 3 or 5 for float images), exact, by a selection network of
    elementwise min/max (several times faster than a sort)."""
    h, w = x.shape[1:]
    r = size // 2
    p = F.pad(x[:, None], (r, r, r, r), mode="replicate")[:, 0]
    values = [p[:, dy:dy + h, dx:dx + w] for dy in range(size) for dx in range(size)]
    for i, j in MEDIAN_NETWORKS[size]:
        values[i], values[j] = torch.minimum(values[i], values[j]), torch.maximum(values[i], values[j])
    return values[size * size // 2]


def primal_dual_step(active, i1wx, i1wy, rho_c, u1, u2, p11, p12, p21, p22, l_t: float, theta: float, taut: float):
    """One TV-L1 iteration for every pair of the batch (``[N, H, W]`` float32; ``active`` ``[N]``
    bool): the thresholding step, the flow update, then the dual update. Pairs not ``active`` keep
    their values. Returns the new state and each pair's summed squared flow update ``[N]`` float64.
    """
    grad = i1wx * i1wx + i1wy * i1wy  # recomputed rather than read: memory traffic is the cost here
    rho = rho_c + (i1wx * u1 + i1wy * u2)
    bound = l_t * grad
    has_grad = grad > torch.finfo(torch.float32).eps
    step = torch.where(rho < -bound, l_t, torch.where(rho > bound, -l_t, torch.where(has_grad, -rho / torch.where(has_grad, grad, 1.0), 0.0)))
    new_u1 = u1 + step * i1wx + theta * divergence(p11, p12)
    new_u2 = u2 + step * i1wy + theta * divergence(p21, p22)
    change = ((new_u1 - u1).square() + (new_u2 - u2).square()).sum(dim=(1, 2), dtype=torch.float64)
    u1x, u1y = forward_gradient(new_u1)
    u2x, u2y = forward_gradient(new_u2)
    n1 = 1 + taut * torch.hypot(u1x, u1y)
    n2 = 1 + taut * torch.hypot(u2x, u2y)
    keep = active[:, None, None]
    return (
        torch.where(keep, new_u1, u1),
        torch.where(keep, new_u2, u2),
        torch.where(keep, (p11 + taut * u1x) / n1, p11),
        torch.where(keep, (p12 + taut * u1y) / n1, p12),
        torch.where(keep, (p21 + taut * u2x) / n2, p21),
        torch.where(keep, (p22 + taut * u2y) / n2, p22),
        change,
    )


def _compiled(function):
    """``function`` through ``torch.compile``, or as it is where compiling fails (no C compiler for
    Triton's launcher, say): slower, never wrong, and said once in the log."""
    compiled = torch.compile(function, dynamic=True)

    @functools.wraps(function)
    def run(*args):
        with torch._dynamo.config.patch(suppress_errors=True):
            return compiled(*args)

    return run


class TVL1Solver:
    """Batched TV-L1 with resolved parameters (see :func:`torch_tvl1_params`) on ``device``.

    ``compile`` runs the primal-dual step and the median filter through ``torch.compile`` (a few
    fused kernels instead of dozens of elementwise ones on a GPU); ``None`` compiles on CUDA only,
    where it pays for itself. Compiled and eager runs give the same flow on the CPU (measured).
    """

    def __init__(self, params: dict, device: str | torch.device = "cpu", compile: bool | None = None):
        self.params = torch_tvl1_params(params)
        self.device = torch.device(device)
        self.cuda_variant = self.params["variant"] == "cuda"
        compile = self.device.type == "cuda" if compile is None else compile
        self._step = _compiled(primal_dual_step) if compile else primal_dual_step
        self._median = _compiled(median_filter) if compile else median_filter
        self._iterate = self._iterate_cuda if self.cuda_variant else self._iterate_cpu

    @torch.no_grad()
    def solve(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Flow from ``first`` to ``second`` (``[N, H, W]`` uint8 or float32 on 0-255), as
        ``[N, H, W, 2]`` float32 pixels (x right, y down) on the solver's device."""
        if first.shape != second.shape or first.ndim != 3:
            raise FlowError(f"expected two [N, H, W] batches of one shape, got {tuple(first.shape)} and {tuple(second.shape)}")
        if min(first.shape[1:]) < 3:
            raise FlowError(f"frames of {tuple(first.shape[1:])} are too small for TV-L1")
        p = self.params
        i0 = first.to(self.device, torch.float32)
        i1 = second.to(self.device, torch.float32)
        sizes = pyramid_sizes(i0.shape[1], i0.shape[2], p["nscales"], p["scale_step"])
        half_pixel = not self.cuda_variant
        down = (1 / p["scale_step"],) * 2
        levels = [(i0, i1)]
        for size in sizes[1:]:
            levels.append(tuple(resize_linear(x, size, down, half_pixel) for x in levels[-1]))
        u1 = u2 = torch.zeros((i0.shape[0], *sizes[-1]), device=self.device)
        for s in range(len(sizes) - 1, -1, -1):
            u1, u2 = self._solve_level(*levels[s], u1, u2)
            if s:
                (h, w), (fine_h, fine_w) = sizes[s], sizes[s - 1]
                scale = (h / fine_h, w / fine_w)
                # Multiplied by the reciprocal, as OpenCV does: dividing rounds differently.
                u1 = resize_linear(u1, sizes[s - 1], scale, half_pixel) * (1 / p["scale_step"])
                u2 = resize_linear(u2, sizes[s - 1], scale, half_pixel) * (1 / p["scale_step"])
        return torch.stack([u1, u2], dim=-1)

    def _solve_level(self, i0, i1, u1, u2):
        p = self.params
        h, w = i0.shape[1:]
        scaled_epsilon = p["epsilon"] ** 2 * h * w
        l_t, taut = p["lambda"] * p["theta"], p["tau"] / p["theta"]
        i1x, i1y = centered_gradient(i1)
        image = torch.stack([i1, i1x, i1y], dim=1)
        p11, p12, p21, p22 = (torch.zeros_like(i0) for _ in range(4))
        for _ in range(p["warps"]):
            warped = warp_cubic(image, u1, u2, a=-0.5 if self.cuda_variant else -0.75, zero_border=not self.cuda_variant)
            i1w, i1wx, i1wy = (x.contiguous() for x in warped.unbind(1))
            rho_c = i1w - i1wx * u1 - i1wy * u2 - i0
            state = (u1, u2, p11, p12, p21, p22)
            u1, u2, p11, p12, p21, p22 = self._iterate((i1wx, i1wy, rho_c), state, scaled_epsilon, l_t, taut)
        return u1, u2

    def _iterate_cpu(self, data, state, scaled_epsilon, l_t, taut):
        """OpenCV CPU's loops: outer iterations, each a median filter and then inner iterations,
        each pair stopping as soon as its update falls to ``scaled_epsilon``."""
        p = self.params
        live = _LivePairs(data, state)
        for _ in range(p["outer_iterations"]):
            if not live.prune():
                break
            if p["median_filtering"] > 1:
                keep = live.active[:, None, None]
                u1, u2, *duals = live.state
                size = p["median_filtering"]
                live.state = [torch.where(keep, self._median(u1, size), u1), torch.where(keep, self._median(u2, size), u2), *duals]
            for k in range(p["inner_iterations"]):
                if k and k % STEPS_PER_CHECK == 0 and not live.prune():
                    break
                *live.state, change = self._step(live.active, *live.data, *live.state, l_t, p["theta"], taut)
                live.active = live.active & (change > scaled_epsilon)
        return live.finish()

    def _iterate_cuda(self, data, state, scaled_epsilon, l_t, taut):
        """OpenCV CUDA's loop: up to ``iterations`` steps; the error is looked at on odd steps
        only, and only once the previous look, less ``scaled_epsilon`` a step, is below it."""
        p = self.params
        live = _LivePairs(data, state)
        for k in range(p["iterations"]):
            if k and k % STEPS_PER_CHECK == 0 and not live.prune():
                break
            *live.state, change = self._step(live.active, *live.data, *live.state, l_t, p["theta"], taut)
            looked = (k % 2 == 1) & (live.last_error < scaled_epsilon) & (p["epsilon"] > 0)
            live.active = live.active & ~(looked & (change <= scaled_epsilon))
            live.last_error = torch.where(looked, change, live.last_error - scaled_epsilon)
        return live.finish()


class _LivePairs:
    """The pairs of a batch still iterating, with their ``data`` and ``state`` (lists of ``[n, H,
    W]`` tensors), ``active`` flags, ``last_error`` (the ``cuda`` variant's stopping rule) and
    positions in the batch.

    A pair that stops is frozen by the step's ``active`` mask until the next :meth:`prune`, which
    copies its state out and drops it, so that it costs no more steps: a batch then runs about as
    many steps as its pairs need on average, not as many as its slowest pair.
    """

    def __init__(self, data, state):
        self.data, self.state = list(data), list(state)
        self.result = list(state)  # the whole batch's state, filled in as pairs stop
        n = state[0].shape[0]
        self.active = torch.ones(n, dtype=torch.bool, device=state[0].device)
        self.last_error = torch.zeros(n, dtype=torch.float64, device=state[0].device)
        self.index = torch.arange(n, device=state[0].device)

    def prune(self) -> bool:
        """Drop the pairs that have stopped (waits for the device); False when none is left."""
        if bool(self.active.all()):
            return True
        stopped, keep = self.index[~self.active], self.active
        self._store(stopped, [s[~keep] for s in self.state])
        self.index, self.active, self.last_error = self.index[keep], self.active[keep], self.last_error[keep]
        self.data, self.state = [d[keep] for d in self.data], [s[keep] for s in self.state]
        return len(self.index) > 0

    def finish(self) -> list[torch.Tensor]:
        """The whole batch's state, every pair as it stopped (or as the last step left it)."""
        self._store(self.index, self.state)
        return self.result

    def _store(self, index, values) -> None:
        self.result = [full.index_put((index,), value) for full, value in zip(self.result, values)]


def default_device() -> str:
    """``cuda`` when PyTorch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_description(device: str) -> str:
    """``"cuda:0 (NVIDIA H200)"`` or ``"cpu"``: the device as recorded in dataset.json."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def pairs_per_batch(height: int, width: int, free_bytes: int, bytes_per_pixel: int = 480, limit: int = 1024) -> int:
    """How many ``height x width`` pairs to solve at once with ``free_bytes`` to spare: the
    pyramid, warped images, flow, duals and the step's temporaries come to about
    ``bytes_per_pixel`` a pair; half the free memory is used."""
    return max(1, min(limit, free_bytes // 2 // (bytes_per_pixel * height * width)))


class TorchTVL1:
    """The ``torch`` flow backend: :class:`TVL1Solver` on the GPU when there is one.

    ``compute`` solves one video's pairs; ``solve`` takes pairs of many videos at once (the
    batching flow actor uses it). ``threads`` caps PyTorch's CPU threads; ``compile`` as
    :class:`TVL1Solver` takes it (``None``: on CUDA only).
    """

    name = "torch"
    resolve_params = staticmethod(torch_tvl1_params)
    batched = True

    def __init__(self, params: dict | None = None, threads: int = 1, device: str | None = None, memory_fraction: float = 1.0,
                 compile: bool | None = None):
        if device is None or device == "auto":
            device = default_device()
        if torch.device(device).type == "cpu":
            torch.set_num_threads(threads)
        elif memory_fraction < 1:  # this solver shares its GPU with others
            torch.cuda.set_per_process_memory_fraction(memory_fraction, device)
        self.memory_fraction = memory_fraction
        self.solver = TVL1Solver(params or {}, device, compile)
        self.params = self.solver.params
        self.device = device_description(device)
        self._fits: dict[tuple[int, int], int] = {}  # (height, width) -> a batch size that fitted after running out of memory

    def max_batch(self, height: int, width: int) -> int:
        """Pairs of this size to solve at once: 16 on the CPU; on a GPU by the memory free within
        this solver's share (PyTorch's cached blocks count as free); never more than what fitted
        after running out of memory."""
        limit = 16
        if self.solver.device.type == "cuda":
            device = self.solver.device
            free, total = torch.cuda.mem_get_info(device)
            allocated = torch.cuda.memory_allocated(device)
            cached = torch.cuda.memory_reserved(device) - allocated
            limit = pairs_per_batch(height, width, min(free + cached, int(total * self.memory_fraction) - allocated))
        return min(limit, self._fits.get((height, width), limit))

    def solve(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """``[N, H, W]`` uint8 first and second frames to ``[N, H, W, 2]`` float32 flow in pixels,
        in batches of :meth:`max_batch` pairs; a batch that runs out of GPU memory is solved
        again in halves, and that size is kept for the rest of the run."""
        n, h, w = first.shape
        out = np.empty((n, h, w, 2), np.float32)
        i = 0
        while i < n:
            step = min(self.max_batch(h, w), n - i)
            try:
                flow = self.solver.solve(torch.from_numpy(np.ascontiguousarray(first[i:i + step])),
                                         torch.from_numpy(np.ascontiguousarray(second[i:i + step])))
            except torch.cuda.OutOfMemoryError:
                if step == 1:
                    raise
                self._fits[(h, w)] = step // 2
                flow = None
            if flow is None:
                torch.cuda.empty_cache()  # after the except block, whose traceback held the batch's tensors
                continue
            out[i:i + step] = flow.cpu().numpy()
            i += step
        return out

    def compute(self, frames: np.ndarray) -> np.ndarray:
        """``[T, H, W] uint8`` gray to ``[T-1, H, W, 2] float32`` pixels (x right, y down)."""
        check_gray_frames(frames)
        return self.solve(frames[:-1], frames[1:])
