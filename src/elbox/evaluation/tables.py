"""The evaluation result (elbox.evaluation.evaluator.evaluate's dict) as the table `elbox evaluate` prints."""

from __future__ import annotations

from elbox.models.estimates import ACTIVE_UNIT_THRESHOLD

PRINTED_ZERO = 5e-4


def iwae_equals_exact(result: dict) -> bool:
    """True when the result has the exact NLL and every IWAE-K NLL equals it to the printed precision, each gap
    NLL_K - NLL_exact and its standard error below PRINTED_ZERO (an exact posterior q, as the mixture's)."""
    gaps, stderrs = result.get("gap_iw_by_k"), result.get("gap_iw_stderr_by_k")
    if "nll_exact" not in result or not gaps or not stderrs or set(gaps) != set(result.get("nll_iw_by_k", {})):
        return False
    return all(abs(gaps[k]) < PRINTED_ZERO and abs(stderrs[k]) < PRINTED_ZERO for k in gaps)


def format_table(result: dict) -> str:
    """A human-readable table of an evaluation result.

    Two kinds of rows are left out of the table (not out of the result): bits/dim for vectors of real numbers
    (data_space "real": a density of real numbers in the data's own units, not a code length of 8-bit data), and,
    for a model with an exact log p(x), the IWAE-K rows when every K equals the exact value with a zero gap
    (iwae_equals_exact: one row says so instead)."""
    nats = lambda key: f"{result[key]:.3f} ± {result[key + '_stderr']:.3f} nats"  # noqa: E731
    show_iwae = not iwae_equals_exact(result)
    show_bits = result.get("data_space") != "real"
    rows = [("examples", f"{result['n_examples']}")]
    if "nll_exact" in result:
        rows.append(("NLL (exact)", nats("nll_exact")))
    if "elbo" in result:
        rows.append(("ELBO", nats("elbo")))
        rows.append(("  reconstruction", f"{result['reconstruction']:.3f} nats"))
        rows.append(("  KL", f"{result['kl']:.3f} nats"))
        if len(result["kl_by_group"]) > 1:
            label = "KL" if result.get("kl_by_group_are_kls", True) else "E[log q - log p]"
            rows += [(f"    {label}[{name}]", f"{v:.3f} nats") for name, v in result["kl_by_group"].items()]
    if show_iwae:
        for k, v in result.get("nll_iw_by_k", {}).items():
            rows.append((f"NLL (IWAE, K={k})", f"{v:.3f} ± {result['nll_iw_stderr_by_k'][k]:.3f} nats"))
    else:
        ks = ", ".join(map(str, result["nll_iw_by_k"]))
        rows.append(("NLL (IWAE)", f"= NLL (exact) for K = {ks} (gaps < {PRINTED_ZERO} nats)"))
    if "gap_elbo" in result:
        rows.append(("-ELBO - NLL_exact", nats("gap_elbo") + "  (mean KL(q || p(z|x)))"))
    if show_iwae:
        for k, v in result.get("gap_elbo_iw_by_k", {}).items():
            rows.append((f"-ELBO - NLL_K (K={k})", f"{v:.3f} ± {result['gap_elbo_iw_stderr_by_k'][k]:.3f} nats"))
        for k, v in result.get("gap_iw_by_k", {}).items():
            rows.append((f"NLL_K - NLL_exact (K={k})", f"{v:.3f} ± {result['gap_iw_stderr_by_k'][k]:.3f} nats"))
    if "bpd" in result and show_bits:
        also_elbo = (
            f"; {result['bpd_elbo']:.4f} (ELBO)" if "bpd_elbo" in result and result["bpd_source"] != "ELBO" else ""
        )
        rows.append(
            ("bits/dim", f"{result['bpd']:.4f} ± {result['bpd_stderr']:.4f} ({result['bpd_source']})" + also_elbo)
        )
    for name in result.get("bpd_parts", []) if show_bits else []:
        rows.append((f"  bpd_{name}", f"{result[f'bpd_{name}']:.4f} ± {result[f'bpd_{name}_stderr']:.4f}"))
    if "elbo_protocol" in result:
        rows.append(("ELBO estimate", result["elbo_protocol"]))
    if "active_units" in result:
        rows.append(
            (
                "active units",
                f"{result['active_units']} / {result['latent_dim']} (Var[E_q z] > {ACTIVE_UNIT_THRESHOLD})",
            )
        )
        for name, n in result.get("active_units_by_level", {}).items():
            rows.append((f"  active[{name}]", f"{n} / {result['latent_dim_by_level'][name]}"))
    if result.get("log_prob_offset"):
        rows.append(
            ("standardization", f"{result['log_prob_offset']:.2f} nats included (-sum log std: original units)")
            if result.get("data_space") == "real"
            else ("dequantization", f"{result['log_prob_offset']:.2f} nats included (-D ln 256)")
        )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
