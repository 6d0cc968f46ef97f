"""patch_mamba on a tiny randomly initialised MambaForCausalLM (no downloads)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkernels.integrations.transformers import patch_mamba  # noqa: E402


def _tiny():
    cfg = transformers.MambaConfig(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, time_step_rank=4)
    torch.manual_seed(0)
    ref = transformers.MambaForCausalLM(copy.deepcopy(cfg)).eval()
    ours = transformers.MambaForCausalLM(copy.deepcopy(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    assert patch_mamba(ours) == 2
    return ref, ours


@pytest.mark.hf
def test_patched_logits_match_slow_path():
    ref, ours = _tiny()
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.hf
def test_patched_generation_matches():
    ref, ours = _tiny()
    ids = torch.randint(0, 97, (1, 6))
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.hf
def test_patched_model_really_calls_llmkernels():
    """Forcing a backend that cannot run CPU tensors makes the patched model, and only it, fail."""
    import llmkernels

    ref, ours = _tiny()
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad(), llmkernels.use_backend("cuda"):
        ref(ids)
        with pytest.raises(llmkernels.BackendError):
            ours(ids)
