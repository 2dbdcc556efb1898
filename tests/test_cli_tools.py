"""``winattn convert`` and ``winattn export`` as a user runs them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import winattn
from winattn.cli.main import main


def test_convert_torchvision_to_winattn_to_huggingface_keeps_outputs(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    peer = torchvision.models.swin_t(weights=None).eval()
    torch.save(peer.state_dict(), tmp_path / "tv.pth")
    name = "swin_tiny_patch4_window7_224"
    assert main(["convert", str(tmp_path / "tv.pth"), str(tmp_path / "w.safetensors"),
                 "--model", name]) == 0
    assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "hf.safetensors"),
                 "--to", "huggingface"]) == 0
    from winattn.checkpoints.convert import detect_format
    from winattn.checkpoints.io import read_checkpoint

    assert detect_format(read_checkpoint(str(tmp_path / "hf.safetensors"))[0]) == "huggingface"
    ours = winattn.create_model(name, checkpoint=str(tmp_path / "hf.safetensors")).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-4)


def test_convert_refuses_weights_of_another_model(tmp_path, capsys):
    torch.save(winattn.create_model("swin_demo_patch2_window4_16").state_dict(),
               tmp_path / "demo.pth")
    code = main(["convert", str(tmp_path / "demo.pth"), str(tmp_path / "out.safetensors"),
                 "--model", "swin_tiny_patch4_window7_224"])
    assert code == 2
    assert "swin_tiny" in capsys.readouterr().err or not (tmp_path / "out.safetensors").exists()


def test_export_runs_in_onnxruntime_and_rejects_old_opsets(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "demo.onnx"
    name = "swin_demo_patch2_window4_16"
    with pytest.raises(SystemExit) as exc:  # refused by the parser, before any model is built
        main(["export", "--model", name, "--out", str(out), "--opset", "13"])
    assert exc.value.code == 2
    assert "--opset: expected an integer >= 17, got '13'" in capsys.readouterr().err
    torch.manual_seed(0)
    model = winattn.create_model(name).eval()
    torch.save(model.state_dict(), tmp_path / "demo.pth")
    assert main(["export", "--model", name, "--checkpoint", str(tmp_path / "demo.pth"),
                 "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # The default export is fully dynamic: the model's own size (second map = window, unshifted),
    # a larger non-square one and a smaller one (windows shrunk), one file.
    for batch, height, width in [(1, 16, 16), (3, 32, 48), (2, 10, 10)]:
        assert winattn.export.dynamic_graph_is_exact(model, height, width)
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
