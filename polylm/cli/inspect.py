"""`polylm inspect`'s human output: an `Inspection` as a compact tree and a few summary lines."""

from __future__ import annotations

from ..ir import MLP, ALiBi, Attention, Block, ModelIR, MoE, Norm, RoPE
from ..loading.inspect import PARTS, Inspection


def render(report: Inspection) -> str:
    """The report as text: the IR as a tree, then parameters, weights, KV cache, backend and tokenizer."""
    plugin = report.plugin
    title = (f"{report.directory}: {report.family} (model_type {report.model_type}; plugin {plugin.distribution} "
             f"{plugin.version}, entry point {plugin.entry_point}), {report.task}")
    lines = [title, *(f"note: {note}" for note in report.notes)]
    return "\n".join(lines + _tree(_ir_nodes(report.ir)) + _summary(report))


def _ir_nodes(ir: ModelIR) -> list:
    """The IR as (label, text, children) nodes: embedding, one node per kind of layer, final norm, head,
    quantization, context."""
    embedding = ir.embedding
    embed = f"vocab {embedding.vocab_size} × hidden {embedding.hidden_size}"
    embed += f", ×{embedding.scale:g}" if embedding.scale != 1 else ""
    embed += f", learned positions ({embedding.positions.max_positions})" if embedding.positions else ""
    embed += f", then {_norm(embedding.norm)}" if embedding.norm else ""
    tree = [("embedding", embed, [])]
    for block in ir.blocks:
        layers = [i for i, layer in enumerate(ir.layers) if layer is block]
        label = f"layers {_ranges(layers)}" + (f" ({len(layers)} of {ir.num_layers})" if ir.variants
                                               else f" ({ir.num_layers})")
        tree.append((label, _residual(block), [("attention", _attention(block.attention), []),
                                               ("MLP", _mlp(block), []), ("norms", _block_norms(block), [])]))
    tree.append(("final norm", _norm(ir.final_norm), []))
    head = ir.head
    head_text = f"{head.task}, {head.out_features} outputs" + (", tied to the embedding" if head.tied_to_embedding
                                                               else ", bias" if head.bias else "")
    head_text += f", ×{head.logit_scale:g}" if head.logit_scale != 1 else ""
    head_text += f", softcap {head.softcap:g}" if head.softcap else ""
    tree.append(("head", head_text, []))
    quantization = ir.quantization
    tree.append(("quantization", "none (--quantize int8|int4 quantizes at load)" if quantization is None
                 else f"int{quantization.bits}, group {quantization.group_size or 'per row'}", []))
    tree.append(("context", f"{ir.context_length} tokens", []))
    return tree


def _summary(report: Inspection) -> list[str]:
    """Parameters, weight bytes, KV cache, backend and tokenizer, a line each."""
    ir, head, counts = report.ir, report.ir.head, report.parameters
    parts = " · ".join(f"{name} {counts[name]:,}" for name in PARTS if name != "head" or not head.tied_to_embedding)
    lines = [f"parameters     {counts['total']:,} ({parts}{' · head tied' if head.tied_to_embedding else ''})"]
    lines.append("weights        " + " · ".join(f"{dtype} {_size(n)}" for dtype, n in report.weight_bytes.items()))
    lines.append("  --quantize   " + " · ".join(f"{name} {_size(sum(sizes.values()))}"
                                               for name, sizes in report.quantized_bytes.items()))
    lines.append(f"KV cache       {report.kv_dtype} {_size(report.kv_bytes_per_token)} per token · "
                 f"{_size(report.kv_bytes_at_context)} at the full context ({ir.context_length} tokens)")
    backend = report.backend
    if backend.auto is None:
        lines.append(f"backend        auto finds none: {backend.reason}")
    else:
        lines.append(f"backend        auto → {backend.auto}, the first in auto order that runs here: "
                     f"{backend.reason}")
        names = [state["name"] for state in backend.backends]
        lines += [f"  passed over  {state['name']}: {state['reason']}"
                  for state in backend.backends[:names.index(backend.auto)]]
    lines.append(f"tokenizer      {'tokenizer.json' if report.tokenizer else 'none'} · "
                 f"chat template: {report.chat_template or 'none'}")
    return lines


def _tree(nodes: list, indent: str = "") -> list[str]:
    """(label, text, children) nodes drawn with box-drawing branches, labels padded to one column."""
    width = max(len(label) for label, _, _ in nodes)
    lines = []
    for i, (label, text, children) in enumerate(nodes):
        last = i == len(nodes) - 1
        lines.append(f"{indent}{'└─' if last else '├─'} {label:<{width}}  {text}".rstrip())
        lines += _tree(children, indent + ("   " if last else "│  ")) if children else []
    return lines


def _ranges(indices: list[int]) -> str:
    """0, 1, 2, 5, 7, 8 → "0–2, 5, 7–8"."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def _norm(norm: Norm | None) -> str:
    if norm is None:
        return "none"
    text = f"{'RMSNorm' if norm.kind == 'rms' else 'LayerNorm'} ε={norm.eps:g}"
    text += f", weight +{norm.weight_offset:g}" if norm.weight_offset else ""
    return text + (", bias" if norm.bias else "")


def _position(attention: Attention) -> str:
    position = attention.position
    if isinstance(position, ALiBi):
        return f"ALiBi (max bias {position.max_bias:g})"
    if not isinstance(position, RoPE):
        return "no positions (learned, added to the embedding)"
    text = f"RoPE θ={position.theta:g}"
    text += f" on {attention.rotary_dim} of {attention.head_dim} dims" if position.rotary_fraction != 1 else ""
    text += ", interleaved" if position.interleaved else ""
    scaling = position.scaling
    return text + (f", {scaling.kind} scaling ×{scaling.factor:g}" if scaling else "")


def _attention(attention: Attention) -> str:
    text = (f"{attention.num_heads} heads, {attention.num_kv_heads} key/value heads, head_dim {attention.head_dim}, "
            f"{_position(attention)}")
    text += f", window {attention.window}" if attention.window else ""
    text += f", softcap {attention.softcap:g}" if attention.softcap else ""
    text += ", sinks" if attention.sinks else ""
    text += ", q/k/v stored fused per head" if attention.qkv_layout != "separate" else ""
    text += ", q/k/v bias" if attention.qkv_bias else ""
    text += ", output bias" if attention.out_bias else ""
    text += f", scale {attention.scale:g}" if attention.scale is not None else ""
    qk_norm = attention.qk_norm
    return text + (f", q/k {_norm(qk_norm.norm)} per {qk_norm.scope.replace('_', ' ')}" if qk_norm else "")


def _mlp(block: Block) -> str:
    mlp = block.mlp
    if not isinstance(mlp, MoE):
        return _dense(mlp)
    routing = "softmax, top " if mlp.routing == "softmax_topk" else "top "
    text = (f"{mlp.num_experts} experts, {routing}{mlp.top_k}" + (" renormalized" if mlp.normalize else "")
            + (" (router bias)" if mlp.router_bias else "") + f", each {_dense(mlp.expert)}")
    if mlp.shared is not None:
        text += f"; shared expert{' (gated)' if mlp.shared_gate else ''} {_dense(mlp.shared)}"
    return text


def _dense(mlp: MLP) -> str:
    return (f"{'gated ' if mlp.gated else ''}{mlp.activation}, intermediate {mlp.intermediate_size}"
            + (", bias" if mlp.bias else ""))


def _block_norms(block: Block) -> str:
    if block.parallel and block.mlp_norm is None:  # one norm feeds both branches
        parts = [f"before both {_norm(block.attn_norm)}"]
    else:
        parts = [f"before attention {_norm(block.attn_norm)}", f"before MLP {_norm(block.mlp_norm)}"]
    parts += [f"after {what} {_norm(norm)}" for what, norm in (("attention", block.attn_post_norm),
                                                               ("MLP", block.mlp_post_norm)) if norm]
    return "; ".join(parts)


def _residual(block: Block) -> str:
    text = "parallel attention + MLP" if block.parallel else "attention, then MLP"
    text += f", residual ×{block.residual_scale:g}" if block.residual_scale != 1 else ""
    return text + (", residual from the normed input" if block.residual_from_normed else "")


def _size(size: int) -> str:
    value, unit = float(size), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{size:,} B" if unit == "B" else f"{value:.1f} {unit}"
