"""Drawing of a genotype in the style of the paper's Fig. 3/5 (upper level and Cell DAGs)."""

from __future__ import annotations

import os
from typing import Sequence

from matplotlib.colors import to_rgb
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from matplotlib.path import Path

from bmnas_jax.genotype import Genotype, modality_of
from bmnas_jax.report import plots

MODALITY_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
                   "#e377c2", "#17becf")
SEARCHED = "#1f5fbf"        # searched edges (paper: blue)
FIXED = "#222222"           # fixed edges (paper: black)
CONCAT = "#2e8b57"          # concatenated steps and their edges
UNUSED = "#b0b0b0"
CELL_FACE = "#fff4d6"
CELL_EDGE = "#b8860b"

BOX_W, BOX_H = 1.25, 0.5            # upper-level boxes (data units)
STEP_W, STEP_H = 1.35, 0.62         # inner DAG boxes
UNIT = 0.95                         # inches per data unit
CELL_X0, CELL_DX, CELL_GAP = 2.7, 2.4, 1.3   # upper-level Cell columns and spacing


def modalities(nodes: Sequence[str]) -> list[str]:
  """Modalities in order of first appearance."""
  out = []
  for n in nodes:
    if modality_of(n) not in out:
      out.append(modality_of(n))
  return out


def _tint(color, amount: float = 0.78):
  r, g, b = to_rgb(color)
  return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def _box(ax, x, y, w, h, text, face, edge, *, lw=1.2, ls="-", color="black", fontsize=9,
         weight="normal"):
  patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.03,rounding_size=0.1",
                         facecolor=face, edgecolor=edge, lw=lw, ls=ls, zorder=3)
  ax.add_patch(patch)
  ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=color,
          weight=weight, zorder=4)
  return patch


def _arrow(ax, a, b, color, *, rad=0.0, lw=1.3, ls="-", zorder=2):
  """An arrow from box patch `a` to box patch `b`, clipped at both boxes."""
  ca, cb = _center(a), _center(b)
  arrow = FancyArrowPatch(ca, cb, patchA=a, patchB=b, arrowstyle="-|>", mutation_scale=11,
                          connectionstyle=f"arc3,rad={rad}", color=color, lw=lw, ls=ls,
                          shrinkA=2, shrinkB=2, zorder=zorder)
  ax.add_patch(arrow)
  return arrow


def _s_curve(ax, a, b, color, *, dy_end=0.0, lw=1.3, ls="-"):
  """An arrow from the right edge of box `a` to the left edge of box `b` (offset `dy_end`).

  A cubic curve leaving and entering horizontally: it stays right of `a` and left
  of `b`, so it never crosses the boxes of the feature column.
  """
  (xa, ya), (xb, yb) = _center(a), _center(b)
  x0, x1 = xa + a.get_width() / 2 + 0.04, xb - b.get_width() / 2 - 0.04
  y1 = yb + dy_end
  d = 0.55 * (x1 - x0)
  path = Path([(x0, ya), (x0 + d, ya), (x1 - d, y1), (x1, y1)],
              [Path.MOVETO, Path.CURVE4, Path.CURVE4, Path.CURVE4])
  arrow = FancyArrowPatch(path=path, arrowstyle="-|>", mutation_scale=11, color=color, lw=lw,
                          ls=ls, zorder=2)
  ax.add_patch(arrow)
  return arrow


def _center(patch):
  x, y = patch.get_x(), patch.get_y()
  return (x + patch.get_width() / 2, y + patch.get_height() / 2)


def _upper_layout(g: Genotype):
  """Positions of features (grouped by modality), Cells and the output.

  Cells stand in a staircase (one column each); a Cell sits at the mean height
  of its two inputs, kept at least `CELL_GAP` away from earlier Cells' heights.

  Returns:
    (pos: upper index -> (x, y), groups: modality -> (top y, bottom y),
    output (x, y), (lowest y, highest y)).
  """
  pos, y, groups = {}, 0.0, {}
  for m in modalities(g.nodes):
    members = [u for u, n in enumerate(g.nodes) if modality_of(n) == m]
    top = y
    for u in members:
      pos[u] = (0.0, y)
      y -= 0.75
    groups[m] = (top, y + 0.75)
    y -= 0.45
  n = len(g.nodes)
  for k, cell in enumerate(g.cells):
    yk = sum(pos[u][1] for u in cell.inputs) / 2
    for _ in range(len(g.cells)):
      clash = [pos[n + j][1] for j in range(k) if abs(yk - pos[n + j][1]) < CELL_GAP]
      if not clash:
        break
      yk = clash[0] + (CELL_GAP if yk > clash[0] else -CELL_GAP)
    pos[n + k] = (CELL_X0 + CELL_DX * k, yk)
  out = (CELL_X0 + CELL_DX * len(g.cells) + 0.2,
         sum(pos[u][1] for u in g.concat) / len(g.concat))
  ys = [p[1] for p in pos.values()] + [out[1]]
  return pos, groups, out, (min(ys), max(ys))


def _draw_upper(ax, g: Genotype) -> None:
  n = len(g.nodes)
  used = set(g.used_nodes())
  mods = modalities(g.nodes)
  colors = {m: MODALITY_COLORS[i % len(MODALITY_COLORS)] for i, m in enumerate(mods)}
  pos, groups, out_xy, (low, high) = _upper_layout(g)
  for m, (top, low) in groups.items():
    ax.add_patch(Rectangle((-BOX_W / 2 - 0.22, low - BOX_H / 2 - 0.12), BOX_W + 0.44,
                           top - low + BOX_H + 0.24, facecolor=_tint(colors[m], 0.9),
                           edgecolor=colors[m], lw=0.8, zorder=1))
    ax.text(-BOX_W / 2 - 0.35, (top + low) / 2, m, rotation=90, ha="right", va="center",
            fontsize=10, color=colors[m], weight="bold")
  patches = {}
  for u, name in enumerate(g.nodes):
    x, y = pos[u]
    c = colors[modality_of(name)]
    if name in used:
      patches[u] = _box(ax, x, y, BOX_W, BOX_H, name, _tint(c, 0.6), c, lw=1.8, weight="bold")
    else:
      patches[u] = _box(ax, x, y, BOX_W, BOX_H, name, "#f2f2f2", UNUSED, ls="--",
                        color=UNUSED)
  for k, cell in enumerate(g.cells):
    x, y = pos[n + k]
    label = (f"Cell_{k + 1}\nx: {g.upper_name(cell.inputs[0])}\n"
             f"y: {g.upper_name(cell.inputs[1])}")
    patches[n + k] = _box(ax, x, y, 1.45, 0.95, label, CELL_FACE, CELL_EDGE, lw=1.6,
                          fontsize=8)
  for k, cell in enumerate(g.cells):
    for slot, u in enumerate(cell.inputs):
      _s_curve(ax, patches[u], patches[n + k], SEARCHED, dy_end=0.2 if slot == 0 else -0.2,
               ls="-" if slot == 0 else "--")
  head = _box(ax, out_xy[0], out_xy[1], 1.3, 1.1, "Output\nconcat\nLN, ReLU\nFC", "#ececec",
              FIXED, fontsize=8)
  by_height = sorted(set(g.concat), key=lambda u: -_center(patches[u])[1])
  for i, u in enumerate(by_height):         # higher sources enter the head higher
    _s_curve(ax, patches[u], head, FIXED, lw=1.6,
             dy_end=0.8 * ((len(by_height) - 1) / 2 - i) / max(len(by_height) - 1, 1))
  ax.set_xlim(-BOX_W / 2 - 1.0, out_xy[0] + 0.9)
  ax.set_ylim(low - 0.8, high + 0.75)
  ax.set_aspect("equal")
  ax.axis("off")
  ax.set_title("Upper level: features (bold: used, grey: unused) and Cells\n"
               "blue: searched edges (solid x, dashed y); black: fixed", fontsize=9)


def _inner_layout(steps: int):
  xs = {0: (0.0, 1.25), 1: (0.0, -0.25)}
  for j in range(steps):
    xs[2 + j] = (1.85 + 1.75 * j, 0.5)
  return xs


def _draw_cell(ax, g: Genotype, k: int) -> None:
  cell = g.cells[k]
  n_steps = len(cell.steps)
  pos = _inner_layout(n_steps)
  names = [g.upper_name(u) for u in cell.inputs]
  mods = modalities(g.nodes)
  colors = {m: MODALITY_COLORS[i % len(MODALITY_COLORS)] for i, m in enumerate(mods)}
  patches = {}
  for v, (label, u) in enumerate(zip(("x", "y"), cell.inputs)):
    c = colors[modality_of(names[v])] if u < len(g.nodes) else CELL_EDGE
    face = _tint(c, 0.6) if u < len(g.nodes) else CELL_FACE
    patches[v] = _box(ax, *pos[v], STEP_W, STEP_H, f"{label}\n{names[v]}", face, c, lw=1.5,
                      fontsize=8)
  concat = set(cell.concat)
  for j, step in enumerate(cell.steps):
    v = 2 + j
    in_concat = v in concat
    patches[v] = _box(ax, *pos[v], STEP_W, STEP_H, f"Step {j + 1}\n{step.op}",
                      "#e6f0fb" if not in_concat else _tint(CONCAT, 0.8),
                      CONCAT if in_concat else SEARCHED, lw=2.4 if in_concat else 1.3,
                      fontsize=8, weight="bold" if in_concat else "normal")
  for j, step in enumerate(cell.steps):
    v = 2 + j
    for slot, src in enumerate(step.inputs):
      if src < 2:
        rad = 0.0 if j == 0 else (-0.25 if src == 0 else 0.25)
      else:
        rad = -0.45 if v - src > 1 else 0.0
      if step.inputs[0] == step.inputs[1]:
        rad += 0.15 if slot == 0 else -0.15
      _arrow(ax, patches[src], patches[v], SEARCHED, rad=rad, ls="-" if slot == 0 else "--")
  last_x = pos[1 + n_steps][0]
  cat = _box(ax, last_x + 1.55, 0.5, 0.95, 0.5, "concat", _tint(CONCAT, 0.85), CONCAT,
             fontsize=8)
  for v in sorted(concat):
    _arrow(ax, patches[v], cat, CONCAT, lw=1.8, rad=-0.3 if v < 1 + n_steps else 0.0)
  out = _box(ax, last_x + 3.0, 0.5, 1.3, 0.8, f"Cell_{k + 1}\n(+x, LN)", CELL_FACE,
             CELL_EDGE, lw=1.6, fontsize=8)
  _arrow(ax, cat, out, FIXED)
  _arrow(ax, patches[0], out, UNUSED, rad=-0.18, ls=":", lw=1.2, zorder=1)
  ax.set_xlim(-STEP_W / 2 - 0.2, last_x + 3.8)
  ax.set_ylim(-0.95, 2.05)
  ax.set_aspect("equal")
  ax.axis("off")
  ax.set_title(f"Cell_{k + 1} ({names[0]}, {names[1]}): steps; green: concatenated; "
               f"dotted: residual x", fontsize=9)


def draw_genotype(g: Genotype, path: str | os.PathLike, title: str | None = None) -> str:
  """Draws `g`: left the upper level, right each Cell's inner DAG; writes a PNG.

  Left: feature nodes grouped and coloured by modality (used ones bold, unused
  ones grey and dashed), Cells as boxes with an arrow from each of their two
  inputs, the output head fed by the concatenated nodes. Right: per Cell, x and
  y (labelled with the upper node they read), the steps with their op names, the
  inner edges, and the concatenated steps marked in green.

  Returns:
    The PNG path.
  """
  _, _, out_xy, (low, high) = _upper_layout(g)
  left_w = out_xy[0] + 0.9 + BOX_W / 2 + 1.0
  left_h = high - low + 1.55
  max_steps = max(len(c.steps) for c in g.cells)
  right_w = STEP_W / 2 + 0.2 + 1.85 + 1.75 * (max_steps - 1) + 3.8
  right_h = 3.0 * len(g.cells)
  height = max(left_h, right_h)
  fig = plots.new_figure(UNIT * (left_w + right_w) + 0.6, UNIT * height + 0.9)
  gs = fig.add_gridspec(len(g.cells), 2, width_ratios=[left_w, right_w], wspace=0.05,
                        hspace=0.25)
  _draw_upper(fig.add_subplot(gs[:, 0]), g)
  for k in range(len(g.cells)):
    _draw_cell(fig.add_subplot(gs[k, 1]), g, k)
  if title:
    fig.suptitle(title, fontsize=11)
  return plots.save(fig, path)
