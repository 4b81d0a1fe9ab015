"""Tests for spectrakit.weights: modules, files, folders and state dicts give the same matrices."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from spectrakit.errors import SpectrakitError
from spectrakit.weights import MatrixRecord, iter_matrices
from spectrakit.weights import files as weight_files

SRC = Path(__file__).resolve().parents[1] / "src"


# -- helpers --------------------------------------------------------------------


def by_name(source, **options) -> dict[str, MatrixRecord]:
    return {record.name: record for record in iter_matrices(source, **options)}


def assert_same_matrices(expected: dict[str, MatrixRecord], actual: dict[str, MatrixRecord]):
    assert sorted(actual) == sorted(expected)
    for name, record in actual.items():
        reference = expected[name]
        assert (record.kind, record.shape, record.dtype) == (
            reference.kind,
            reference.shape,
            reference.dtype,
        ), name
        assert torch.equal(record.load(), reference.load()), name


def write_safetensors_by_hand(path: Path, tensors: dict[str, tuple[tuple[int, ...], float]]):
    """Write float32 constant tensors one at a time, never holding them all."""
    header, offset = {}, 0
    for name, (shape, _) in tensors.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for shape, value in tensors.values():
            handle.write(torch.full(shape, value, dtype=torch.float32).numpy().data)


class NotATensor:
    """Anything a weights-only unpickler must refuse."""


# -- tiny Hugging Face models --------------------------------------------------------


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_bert])
def test_module_folder_file_and_shards_give_the_same_matrices(build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    from_module = by_name(model)

    folder = tmp_path / "folder"
    model.save_pretrained(folder, safe_serialization=True)
    assert_same_matrices(from_module, by_name(folder))
    # The single file, once beside its config.json and once alone.
    assert_same_matrices(from_module, by_name(folder / "model.safetensors"))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "model.safetensors", alone / "weights.safetensors")
    assert_same_matrices(from_module, by_name(alone / "weights.safetensors"))

    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert_same_matrices(from_module, by_name(sharded))

    # A torch.save'd state dict in a folder (tied weights come back as aliases).
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    shutil.copy(folder / "config.json", bin_folder / "config.json")
    torch.save(model.state_dict(), bin_folder / "pytorch_model.bin")
    from_bin = by_name(bin_folder)
    assert_same_matrices(from_module, from_bin)
    for name, record in from_module.items():
        assert from_bin[name].aliases == record.aliases


def test_gpt2_conv1d_weights_come_out_out_by_in(tmp_path):
    model = tiny_gpt2()
    records = by_name(model)
    attention = records["transformer.h.0.attn.c_attn.weight"]
    assert attention.kind == "linear"
    assert attention.shape == (96, 32)  # stored (32, 96) by transformers' Conv1D
    assert torch.equal(attention.load(), model.transformer.h[0].attn.c_attn.weight.T)
    assert records["transformer.h.0.mlp.c_fc.weight"].shape == (128, 32)
    assert records["transformer.h.0.mlp.c_proj.weight"].shape == (32, 128)

    path = tmp_path / "gpt2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, path)
    assert by_name(path)["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)
    # transposed= overrides detection: [] keeps the stored layout.
    assert by_name(path, transposed=[])["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)


def test_linear_layers_named_like_gpt2_are_not_transposed(tmp_path):
    # GPT-BigCode and Qwen call nn.Linear layers c_attn/c_proj: stored (out, in), tall.
    state = {
        "h.0.attn.c_attn.weight": torch.randn(96, 32),
        "h.0.attn.c_proj.weight": torch.randn(32, 32),
        "h.0.mlp.c_fc.weight": torch.randn(128, 32),
    }
    path = tmp_path / "bigcode.safetensors"
    save_file(state, path)
    records = by_name(path)
    assert records["h.0.attn.c_attn.weight"].shape == (96, 32)
    assert torch.equal(records["h.0.attn.c_proj.weight"].load(), state["h.0.attn.c_proj.weight"])
    # A config.json naming a non-Conv1D model wins over the names.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode"}))
    save_file({"h.0.attn.c_attn.weight": torch.randn(32, 96)}, tmp_path / "wide.safetensors")
    assert by_name(tmp_path / "wide.safetensors")["h.0.attn.c_attn.weight"].shape == (32, 96)


def test_tied_weights_are_reported_once_with_their_alias():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    records = list(iter_matrices(model))
    names = [record.name for record in records]
    assert "lm_head.weight" not in names
    (embedding,) = [record for record in records if record.name == "transformer.wte.weight"]
    assert embedding.kind == "embedding"
    assert embedding.aliases == ("lm_head.weight",)
    # An alias matches include patterns too: it names the same matrix.
    assert [r.name for r in iter_matrices(model, include="lm_head")] == ["transformer.wte.weight"]


def test_tied_tensors_in_a_state_dict_share_one_record(tmp_path):
    shared = torch.randn(10, 4)
    state = {"embed.weight": shared, "proj.weight": torch.randn(4, 4), "head.weight": shared}
    records = list(iter_matrices(state))
    assert [(r.name, r.aliases) for r in records] == [
        ("embed.weight", ("head.weight",)),
        ("proj.weight", ()),
    ]
    torch.save(state, tmp_path / "tied.pt")
    assert by_name(tmp_path / "tied.pt")["embed.weight"].aliases == ("head.weight",)
    # Two different views of one storage are two matrices, not a tie.
    base = torch.randn(8, 4)
    assert len(list(iter_matrices({"a": base[:4], "b": base[4:]}))) == 2


def test_conv_kinds_shapes_and_matrices(tmp_path):
    model = nn.Sequential(
        nn.Conv1d(3, 8, kernel_size=5),
        nn.Conv2d(8, 16, kernel_size=3, bias=False),
        nn.Conv2d(16, 16, kernel_size=3, groups=4),
        nn.BatchNorm2d(16),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    records = list(iter_matrices(model))
    assert [(r.name, r.kind, r.shape, r.matrix_shape) for r in records] == [
        ("0.weight", "conv1d", (8, 3, 5), (8, 15)),
        ("1.weight", "conv2d", (16, 8, 3, 3), (16, 72)),
        ("2.weight", "conv2d", (16, 4, 3, 3), (16, 36)),
        ("5.weight", "linear", (10, 16), (10, 16)),
    ]
    assert torch.equal(records[1].matrix(), model[1].weight.detach().reshape(16, 72))

    path = tmp_path / "convs.safetensors"
    save_file(model.state_dict(), path)
    assert_same_matrices(by_name(model), by_name(path))


def test_other_matrix_parameters_and_attention_in_proj():
    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2)
            self.position = nn.Parameter(torch.randn(1, 5, 8))
            self.norm = nn.LayerNorm(8)

    records = by_name(WithTable())
    assert records["attention.in_proj_weight"].kind == "matrix"
    assert records["attention.in_proj_weight"].shape == (24, 8)
    assert records["attention.out_proj.weight"].kind == "linear"
    assert records["position"].kind == "matrix"
    assert records["position"].matrix().shape == (5, 8)  # leading unit axis dropped
    assert not any("norm" in name or "bias" in name for name in records)


def test_meta_device_layers_give_records_without_data():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.Embedding(7, 4))
    records = list(iter_matrices(model))
    assert [(r.name, r.shape, r.is_meta) for r in records] == [
        ("0.weight", (6, 4), True),
        ("1.weight", (7, 4), True),
    ]
    assert records[0].matrix().is_meta
    assert not next(iter_matrices(nn.Linear(2, 2))).is_meta


def test_parametrized_weight_is_reported_under_its_plain_name():
    layer = nn.Linear(6, 4)
    torch.nn.utils.parametrizations.orthogonal(layer)
    (record,) = iter_matrices(nn.Sequential(layer))
    assert (record.name, record.kind, record.shape) == ("0.weight", "linear", (4, 6))
    assert torch.equal(record.load(), layer.weight.detach())


def test_include_exclude_and_kinds():
    model = tiny_llama()
    everything = [r.name for r in iter_matrices(model)]
    assert [r.name for r in iter_matrices(model, include="q_proj")] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]
    globbed = [r.name for r in iter_matrices(model, include="model.layers.1.*_proj.weight")]
    assert len(globbed) == 7 and all(".layers.1." in name for name in globbed)
    # A glob must match the whole name, unlike a plain substring.
    assert list(iter_matrices(model, include="layers.1.*")) == []
    both = [r.name for r in iter_matrices(model, include=["q_proj", "k_proj"], exclude="layers.0")]
    assert both == ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    no_mlp = [r.name for r in iter_matrices(model, exclude=["*mlp*", "lm_head"])]
    assert no_mlp == [n for n in everything if "mlp" not in n and n != "lm_head.weight"]
    assert [r.name for r in iter_matrices(model, kinds="embedding")] == ["model.embed_tokens.weight"]
    with pytest.raises(SpectrakitError, match="unknown matrix kind 'conv3d'"):
        iter_matrices(model, kinds=["linear", "conv3d"])


def test_files_are_listed_in_natural_name_order(tmp_path):
    path = tmp_path / "layers.safetensors"
    save_file({f"layers.{i}.weight": torch.randn(3, 3) for i in (10, 2, 9, 1)}, path)
    assert [r.name for r in iter_matrices(path)] == [
        "layers.1.weight",
        "layers.2.weight",
        "layers.9.weight",
        "layers.10.weight",
    ]


# -- torch checkpoints -----------------------------------------------------------------


def test_torch_state_dicts_load_plain_wrapped_and_legacy(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    expected = by_name(model)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "model_key.bin")
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("plain.pt", "wrapped.pth", "model_key.bin", "legacy.pt"):
        assert_same_matrices(expected, by_name(tmp_path / name))
    assert_same_matrices(expected, by_name(model.state_dict()))


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 2", "pickle default protocol"])
def test_a_pickle_of_arbitrary_objects_is_refused(tmp_path, how):
    path = tmp_path / "unsafe.bin"
    if how == "torch.save":
        torch.save({"weight": torch.zeros(2, 2), "x": NotATensor()}, path)
    else:
        protocol = 2 if how == "pickle protocol 2" else pickle.DEFAULT_PROTOCOL
        with open(path, "wb") as handle:
            pickle.dump({"x": NotATensor()}, handle, protocol=protocol)
    with pytest.raises(SpectrakitError) as caught:
        iter_matrices(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: refused to load: it holds more than tensors (")
    assert "never unpickles" in message and "unsafe.safetensors" in message and "add_safe_globals" not in message
    assert "\n" not in message
    if how != "pickle default protocol":  # newer protocols are refused before any class is seen
        assert "NotATensor" in message


# -- bad input ------------------------------------------------------------------------


def one_line_error(source) -> str:
    with pytest.raises(SpectrakitError) as caught:
        list(iter_matrices(source))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_truncated_and_garbage_files_fail_with_the_file_named(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.randn(64, 64), "b.weight": torch.randn(32, 32)}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    assert one_line_error(truncated).startswith(f"{truncated}: not a valid safetensors file")

    garbage = bytes(range(256)) * 8
    for name in ("garbage.safetensors", "garbage.bin", "garbage.pt"):
        (tmp_path / name).write_bytes(garbage)
        assert one_line_error(tmp_path / name).startswith(f"{tmp_path / name}: ")

    zip_cut = tmp_path / "cut.pt"
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "whole.pt")
    zip_cut.write_bytes((tmp_path / "whole.pt").read_bytes()[:-200])
    assert one_line_error(zip_cut).startswith(f"{zip_cut}: ")

    (tmp_path / "weights.npz").write_bytes(b"PK")
    assert "unknown file type" in one_line_error(tmp_path / "weights.npz")


def test_missing_paths_and_shards(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    assert one_line_error(missing) == f"{missing}: no such file or directory"
    assert one_line_error(str(tmp_path / "nowhere")) == f"{tmp_path / 'nowhere'}: no such file or directory"
    (tmp_path / "empty").mkdir()
    assert "no weights found" in one_line_error(tmp_path / "empty")

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a.weight": torch.randn(4, 4)}, sharded / "model-1.safetensors")
    save_file({"b.weight": torch.randn(4, 4)}, sharded / "model-2.safetensors")
    index = {"weight_map": {"a.weight": "model-1.safetensors", "b.weight": "model-2.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert sorted(by_name(sharded)) == ["a.weight", "b.weight"]
    (sharded / "model-2.safetensors").unlink()
    message = one_line_error(sharded)
    assert message.startswith(f"{sharded / 'model-2.safetensors'}: shard listed in")


def test_sharded_torch_folder_and_unindexed_safetensors_folder(tmp_path):
    weights = {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(6, 4)}
    bins = tmp_path / "bins"
    bins.mkdir()
    torch.save({"a.weight": weights["a.weight"]}, bins / "pytorch_model-1.bin")
    torch.save({"b.weight": weights["b.weight"]}, bins / "pytorch_model-2.bin")
    index = {"weight_map": {"a.weight": "pytorch_model-1.bin", "b.weight": "pytorch_model-2.bin"}}
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same_matrices(by_name(weights), by_name(bins))

    loose = tmp_path / "loose"
    loose.mkdir()
    save_file({"a.weight": weights["a.weight"]}, loose / "part-1.safetensors")
    save_file({"b.weight": weights["b.weight"]}, loose / "part-2.safetensors")
    assert_same_matrices(by_name(weights), by_name(loose))
    save_file({"a.weight": weights["a.weight"]}, loose / "part-3.safetensors")
    assert "'a.weight' is in both part-1.safetensors and part-3.safetensors" in one_line_error(loose)


def test_a_tensor_that_fails_to_load_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"layer.weight": torch.randn(4, 4)}, path)
    (record,) = iter_matrices(path)
    path.write_bytes(b"gone")  # replaced after the header was read
    with pytest.raises(SpectrakitError, match=r"w\.safetensors: tensor 'layer\.weight' failed to load"):
        record.load()


def test_unknown_source_type_and_module_transposed_option():
    with pytest.raises(SpectrakitError, match="cannot read weight matrices from a list"):
        iter_matrices([torch.zeros(2, 2)])
    with pytest.raises(SpectrakitError, match="transposed="):
        iter_matrices(nn.Linear(2, 2), transposed=["*"])


# -- laziness and memory ------------------------------------------------------------


def test_listing_records_reads_no_tensor_data(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file({f"layers.{i}.weight": torch.randn(16, 16) for i in range(5)}, path)
    reads: list[str] = []
    real_read = weight_files._read_safetensors_tensor

    def counting_read(source: str, name: str) -> torch.Tensor:
        reads.append(name)
        return real_read(source, name)

    monkeypatch.setattr(weight_files, "_read_safetensors_tensor", counting_read)
    records = list(iter_matrices(path))
    assert len(records) == 5 and [r.numel for r in records] == [256] * 5
    assert reads == []
    records[3].matrix()
    assert reads == ["layers.3.weight"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak RSS")
def test_streaming_a_large_file_holds_one_tensor_at_a_time(tmp_path):
    side, count = 2048, 8  # eight 16 MiB float32 tensors: a 128 MiB file
    tensor_mib = side * side * 4 / 2**20
    path = tmp_path / "big.safetensors"
    tensors = {"warmup.weight": ((64, 64), -1.0)}
    tensors.update({f"layers.{i}.weight": ((side, side), float(i)) for i in range(count)})
    write_safetensors_by_hand(path, tensors)

    script = textwrap.dedent(
        f"""
        import json
        from spectrakit.weights import iter_matrices

        def peak_mib():
            # VmHWM, not getrusage's ru_maxrss: a forked child inherits the
            # parent's (pytest's) high-water mark in ru_maxrss, which would
            # hide any growth here; VmHWM starts afresh with the exec'd process.
            with open("/proc/self/status") as status:
                line = next(line for line in status if line.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024  # kB -> MiB

        records = list(iter_matrices({str(path)!r}))
        records[-1].load()  # the small warm-up tensor sorts last: pay one-time costs first
        before = peak_mib()
        seen = []
        for record in records[:-1]:
            matrix = record.matrix()
            # min and max read every element, so every page really is resident.
            seen.append(float(matrix.min()) + float(matrix.max()))
            del matrix
        print(json.dumps({{"growth": peak_mib() - before, "seen": seen}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["seen"] == [2.0 * i for i in range(count)]  # every tensor really read
    growth = measured["growth"]
    assert growth < 3 * tensor_mib, f"peak RSS grew {growth:.0f} MiB for {tensor_mib:.0f} MiB tensors"
