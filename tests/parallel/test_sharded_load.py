"""from_pretrained on a mesh: every weight is born sharded, read slice by slice from safetensors."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import numpy as np
    from jpeft import tree as T
    from jpeft.models import hf
    from jpeft.parallel import make_mesh
    reads, real = [], hf._read_slice
    def spy(path, parts, index):
        out = real(path, parts, index)
        reads.append((path, out.size))
        return out
    hf._read_slice = spy
    _, whole = hf.from_pretrained({model!r})
    sizes = {{p: int(np.size(v)) for p, v in T.flatten(whole).items()}}
    reads.clear()
    report = {{}}
    for shape in [(1, 8, 1), (2, 2, 2), (1, 2, 4)]:
        reads.clear()
        _, sharded = hf.from_pretrained({model!r}, dtype="bfloat16", mesh=make_mesh(*shape))
        flat = T.flatten(sharded)
        equal = all(np.array_equal(np.asarray(flat[p], np.float32),
                                   np.asarray(np.asarray(v).astype(flat[p].dtype), np.float32))
                    for p, v in T.flatten(whole).items())
        largest = max(size / sizes[p] for p, size in reads)
        shard = {{p: [list(s.data.shape) for s in v.addressable_shards][0] for p, v in flat.items()}}
        report["x".join(map(str, shape))] = {{"equal": equal, "largest_read": largest,
                                               "dtype": str(flat["lm_head/kernel"].dtype), "shard": shard}}
    # QLoRA's codes read a layer at a time into their device slices: those of quantizing the one-device load
    import jax, jpeft
    qlora = jpeft.QLoRA(double_quant=True)
    expected = T.flatten(qlora.init(jax.random.key(0), hf.from_pretrained({model!r}, dtype="bfloat16")[1]))
    reads.clear()
    _, loaded = hf.from_pretrained({model!r}, dtype="bfloat16", mesh=make_mesh(2, 2, 2), quantize=qlora)
    loaded = T.flatten(qlora.init(jax.random.key(0), loaded))
    report["qlora"] = {{"leaves": sorted(loaded) == sorted(expected),
                        "codes": all(np.array_equal(loaded[p], v) for p, v in expected.items() if v.dtype == np.uint8),
                        "floats": max(float(np.max(np.abs(np.asarray(loaded[p], np.float32) - np.asarray(v, np.float32))
                                                   / np.maximum(np.abs(np.asarray(v, np.float32)), 1e-30)))
                                      for p, v in expected.items() if v.dtype != np.uint8),
                        "largest_read": max(size / sizes[p] for p, size in reads if qlora.quantizes(p))}}
    print(json.dumps(report))
""")


def test_weights_are_read_straight_into_their_device_slices(tmp_path):
    from conftest import make_hf_model, save_hf_model
    model_dir = save_hf_model(make_hf_model("llama", vocab_size=96), tmp_path / "llama")
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(model=model_dir)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    qlora = report.pop("qlora")
    for mesh, r in report.items():
        assert r["equal"] and r["dtype"] == "bfloat16", mesh
    # fsdp=8: no read ever covers more than one eighth of a weight (no whole copy on the host)
    assert report["1x8x1"]["largest_read"] == 1 / 8
    assert report["1x8x1"]["shard"]["model/layers/mlp/gate_proj/kernel"] == [2, 4, 64]
    assert report["2x2x2"]["shard"]["model/layers/mlp/gate_proj/kernel"] == [2, 16, 32]
    assert report["1x2x4"]["shard"]["lm_head/kernel"] == [16, 24]
    # QLoRA's quantized leaves are read one layer's device slice at a time, as codes equal to quantizing the
    # loaded base (double quantization's float statistics to a float32 ulp: a mean over one layer or the stack)
    assert qlora["leaves"] and qlora["codes"] and qlora["floats"] < 3e-7 and qlora["largest_read"] <= 1 / 4, qlora
