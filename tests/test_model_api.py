"""The model keeps its own API (DESIGN §4c): on transformers' own classes (tiny configs), the compiled
module's generate gives the original's greedy tokens, config is the model's, save_pretrained writes
the original coordinates that from_pretrained loads back, forward has the model's signature, and
transformers.Trainer trains it."""
import copy
import inspect
import os

import pytest
import torch

import invariance_compiler as ic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()

V, L = 32, 8


def _model(family):
    torch.manual_seed(0)
    if family == "llama":
        cfg = T.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return T.LlamaForCausalLM(cfg).eval()
    cfg = T.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                       eos_token_id=1, pad_token_id=1)
    return T.GPT2LMHeadModel(cfg).eval()


def _ids(n=2, seed=0):
    return torch.randint(2, V, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", ["gspace", "fixed"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_config_signature_and_save_pretrained(family, form, tmp_path):
    model = _model(family)
    ids = _ids()
    cm = ic.compile_invariant(model, (ids,), form=form)            # default config: use_cache=True
    assert cm.config.to_dict() == model.config.to_dict()
    assert inspect.signature(cm.forward) == inspect.signature(model.forward)
    greedy = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(cm.generate(ids, **greedy), model.generate(ids, **greedy))
    with pytest.raises(AttributeError, match="cm.bound"):
        cm.get_input_embeddings()                    # a method of the model: needs the weights bound
    with torch.no_grad():                            # move the module, so that saving has to follow it
        for p in cm.parameters():
            p.mul_(1.01)
    cm.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()
    assert torch.allclose(back(ids).logits, cm(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        x = _ids(1, seed=i)[0]
        return {"input_ids": x, "labels": x.clone()}


@pytest.mark.parametrize("form", ["gspace", "fixed"])
def test_trainer_trains_the_compiled_module(form, tmp_path):
    pytest.importorskip("accelerate")
    cm = ic.compile_invariant(_model("llama"), (_ids(),), form=form).train()
    data = _Tokens()
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("input_ids", "labels")}
    loss = lambda: float(cm(**batch).loss)                            # noqa: E731
    before = loss()
    args = T.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                               learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    T.Trainer(model=cm, args=args, train_dataset=data).train()
    assert loss() < before
