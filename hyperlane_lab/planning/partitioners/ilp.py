"""'ilp': the fixed-order problem of 'dp' as a mixed-integer program, solved by HiGHS (scipy.milp).

Path formulation on a DAG. Nodes: the source (client, layer 0), one node (k, e) per device k and
end layer e, and the sink (client). A binary edge variable x picks one stage:

* source → (k, e): device k runs [0, e) first; cost hop(client→k) + stage_k[0, e]
* (p, j) → (k, e): device k runs [j, e) after p; cost hop(p→k) + stage_k[j, e]
* (k, L) → sink:   cost hop(k→client)

with p = k−1 only (every device used), or any p < k when ``allow_skip``. Spans that do not fit
memory have no edge. Constraints: one unit of flow leaves the source and is conserved at every
node (binary x on a DAG ⇒ exactly one source–sink path, each node entered at most once).

* latency:    min Σ c_e x_e                             (= R)
* throughput: min z,  z ≥ (1/m) Σ c_e x_e,               (z ≥ R/m)
              z ≥ Σ_{e into v} s_e x_e for every node v   (z ≥ every server on the path)
  where s_e = max(stage time, hop serialization) of edge e; aggregating per node is valid because
  at most one edge into a node is chosen. At the optimum z = λ = max(R/m, M).

Costs are divided by their largest value before solving so HiGHS' absolute tolerances bite
uniformly. Meant as an independent check of 'dp' (and a base for side constraints), not for speed.
"""

from __future__ import annotations

import logging

import numpy as np

from hyperlane_lab.planning.partitioners.base import Assignment, capacity_error, register
from hyperlane_lab.planning.table import CostTable

__all__ = ["ilp"]

log = logging.getLogger(__name__)


@register("ilp")
def ilp(table: CostTable) -> Assignment:
    """Exact fixed-order optimum as a MILP (HiGHS); see module docstring for the formulation."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    D, L, c = table.n_devices, table.n_layers, table.client
    o = table.options
    if D > L and not o.allow_skip:
        raise capacity_error(
            table, "ilp", f"{D} devices but only {L} layers; set allow_skip or use 'dp_select'"
        )
    stage = table.service()
    ltime, lser = table.link_time, table.link_ser

    node_id: dict[tuple[int, int], int] = {}  # (k, e) -> node row
    for k in range(D):
        for e in range(1, L + 1):
            node_id[(k, e)] = len(node_id)
    source, sink = len(node_id), len(node_id) + 1
    edges: list[tuple[int, int, float, float, int, int]] = []  # (from, to, cost, service, device, end)
    for k in range(D):
        preds = list(range(k)) if o.allow_skip else ([k - 1] if k else [])
        for e in range(1, L + 1):
            for j in range(e):
                s = float(stage[k, j, e])
                if not np.isfinite(s):
                    continue
                if j == 0 and (k == 0 or o.allow_skip):
                    edges.append((source, node_id[(k, e)], ltime[c, k] + s, max(s, lser[c, k]), k, e))
                for p in preds if j > 0 else ():
                    edges.append(
                        (node_id[(p, j)], node_id[(k, e)], ltime[p, k] + s, max(s, lser[p, k]), k, e)
                    )
        if o.allow_skip or k == D - 1:
            edges.append((node_id[(k, L)], sink, float(ltime[k, c]), float(lser[k, c]), -1, L))
    if not edges:
        raise capacity_error(table, "ilp")

    n_e = len(edges)
    cost = np.array([e[2] for e in edges])
    svc = np.array([e[3] for e in edges])
    scale = float(max(cost.max(), svc.max(), 1e-300))
    cost, svc = cost / scale, svc / scale
    src = np.array([e[0] for e in edges])
    dst = np.array([e[1] for e in edges])
    cols = np.arange(n_e)
    n_nodes = len(node_id) + 2
    # flow: rows = nodes; +1 for an edge entering, −1 for one leaving; source row = −1, others 0
    flow = coo_array(
        (
            np.concatenate([np.ones(n_e), -np.ones(n_e)]),
            (np.concatenate([dst, src]), np.concatenate([cols, cols])),
        ),
        shape=(n_nodes, n_e + 1),
    ).tocsr()
    rhs = np.zeros(n_nodes)
    rhs[source], rhs[sink] = -1.0, 1.0
    constraints = [LinearConstraint(flow, rhs, rhs)]
    objective = np.zeros(n_e + 1)
    if o.objective == "latency":
        objective[:n_e] = cost
    else:
        objective[n_e] = 1.0
        # z − (1/m) Σ c x >= 0
        sum_row = coo_array(
            (np.append(-cost / o.concurrency, 1.0), (np.zeros(n_e + 1, dtype=int), np.arange(n_e + 1))),
            shape=(1, n_e + 1),
        )
        # z − Σ_{e into v} s_e x_e >= 0 for every node v
        svc_rows = coo_array(
            (
                np.concatenate([-svc, np.ones(n_nodes)]),
                (np.concatenate([dst, np.arange(n_nodes)]), np.concatenate([cols, np.full(n_nodes, n_e)])),
            ),
            shape=(n_nodes, n_e + 1),
        )
        constraints += [
            LinearConstraint(sum_row.tocsr(), 0.0, np.inf),
            LinearConstraint(svc_rows.tocsr(), 0.0, np.inf),
        ]
    integrality = np.append(np.ones(n_e), 0.0)
    upper = np.append(np.ones(n_e), np.inf)
    res = milp(
        objective,
        integrality=integrality,
        bounds=Bounds(np.zeros(n_e + 1), upper),
        constraints=constraints,
        options={"time_limit": o.ilp_time_limit_s, "mip_rel_gap": 1e-9},
    )
    if res.status == 2 or res.x is None:
        if res.status == 2:
            raise capacity_error(table, "ilp")
        raise ValueError(
            f"ilp: HiGHS stopped without a solution ({res.message}); raise options.ilp_time_limit_s "
            f"(now {o.ilp_time_limit_s} s) or use 'dp'"
        )
    if res.status != 0:
        log.warning("ilp: HiGHS stopped early (%s); the plan may not be optimal", res.message)
    chosen = [edges[i] for i in range(n_e) if res.x[i] > 0.5]
    by_src = {edge[0]: edge for edge in chosen}
    order: list[int] = []
    bounds, at = [0], source
    while at != sink:
        edge = by_src[at]
        if edge[1] != sink:
            order.append(edge[4])
            bounds.append(edge[5])
        at = edge[1]
    return tuple(order), tuple(bounds)
