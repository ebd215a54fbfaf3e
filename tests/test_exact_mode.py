"""#22's exact mode (SPECDEC_EXACT=1), CPU reference path: a node's logits in an n-node
verify are bitwise its logits as a one-token step once its ancestors are cached."""
import pytest
import torch
from conftest import tiny_model

from specdec.backends.compact import CompactRunner
from specdec.ops import attention as attn
from specdec.tree import TokenTree


@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("llama", torch.float32),
                                          ("gemma3", torch.bfloat16)])
def test_verify_rows_equal_one_token_steps_bitwise(monkeypatch, family, dtype):
    _check_bitwise(monkeypatch, family, dtype)


def _check_bitwise(monkeypatch, family, dtype, dev="cpu", **model_kw):
    monkeypatch.setenv("SPECDEC_EXACT", "1")
    model = tiny_model(family, vocab=64, **model_kw).to(dev, dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 64, (9,), generator=g).to(dev)
    parents = [-1, 0, 0, 1, 3, 2, -1, 6, 4, 8]
    tokens = torch.randint(0, 64, (len(parents),), generator=g).to(dev)
    tree = TokenTree(tokens.cpu(), torch.tensor(parents))
    _, mask = tree.with_root()  # [n + 1, n + 1]
    runner = CompactRunner.from_hf(model, max_length=64)
    L = prompt.numel() - 1
    runner.prefill(prompt[:-1], torch.arange(L, device=dev))
    inp = torch.cat([prompt[-1:], tokens])
    pos = L + torch.cat([torch.zeros(1, dtype=torch.long), tree.depth]).to(dev)
    verify = runner.forward(inp, pos, tree_mask=mask.to(dev))  # [n + 1, V]
    for i in [-1] + list(range(len(parents))):  # the root, then every node
        runner.reset()
        runner.prefill(prompt[:-1], torch.arange(L, device=dev))
        path = [prompt[-1]] + ([tokens[j] for j in tree.path_to(i)] if i >= 0 else [])
        for d, tok in enumerate(path):
            step = runner.forward(torch.tensor([int(tok)], device=dev), torch.tensor([L + d], device=dev))
        assert torch.equal(step[0], verify[i + 1]), (i, (step[0] - verify[i + 1]).abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_verify_rows_equal_one_token_steps_bitwise_gpu(monkeypatch, dtype):
    _check_bitwise(monkeypatch, "llama", dtype, "cuda", hidden_size=64, intermediate_size=96)


def _random_tree(n: int, g: torch.Generator) -> TokenTree:
    """n nodes; node i's parent is uniform over the root (-1) and nodes 0..i-1."""
    parents = [int(torch.randint(-1, i, (1,), generator=g)) if i else -1 for i in range(n)]
    return TokenTree(torch.zeros(n, dtype=torch.long), torch.tensor(parents))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1, 2, 3, 8, 17, 31, 64, 100, 128])
def test_random_tree_rows_equal_one_token_steps_bitwise_gpu(monkeypatch, n):
    """bf16 on the GPU at SmolLM2's width (hidden 576, 9/3 heads, FFN 1536; 2 layers): in a
    random n-node verify, each of up to 12 sampled nodes (the deepest always among them) has
    bitwise the logits of one-token steps along its path."""
    monkeypatch.setenv("SPECDEC_EXACT", "1")
    dev, vocab = "cuda", 4096
    model = tiny_model("llama", vocab=vocab, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3).to(dev, torch.bfloat16)
    g = torch.Generator().manual_seed(n)
    tree = _random_tree(n, g)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    tree = TokenTree(tokens, tree.parents)
    prompt = torch.randint(0, vocab, (37,), generator=g).to(dev)
    runner = CompactRunner.from_hf(model, max_length=256)
    L = prompt.numel() - 1

    def fresh():
        runner.reset()
        runner.prefill(prompt[:-1], torch.arange(L, device=dev))

    fresh()
    _, mask = tree.with_root()
    pos = L + torch.cat([torch.zeros(1, dtype=torch.long), tree.depth]).to(dev)
    verify = runner.forward(torch.cat([prompt[-1:], tokens.to(dev)]), pos, tree_mask=mask.to(dev))  # [n + 1, V]
    deepest = int(tree.depth.argmax())
    picks = sorted({-1, deepest, *torch.randperm(n, generator=g)[:10].tolist()})
    for i in picks:
        fresh()
        path = [int(prompt[-1])] + ([int(tokens[j]) for j in tree.path_to(i)] if i >= 0 else [])
        for d, tok in enumerate(path):
            step = runner.forward(torch.tensor([tok], device=dev), torch.tensor([L + d], device=dev))
        assert torch.equal(step[0], verify[i + 1]), (n, i, (step[0].float() - verify[i + 1].float()).abs().max())


def _exact_ref(q, k, v, L: int, tree_mask, window):
    """One sequence's tree through the packed reference: prefix at slots [0, L), nodes after it."""
    n = q.shape[0]
    mask = torch.ones(n, n, dtype=torch.bool).tril() if tree_mask is None else attn._as_bool_mask(tree_mask, n)
    anc, cnt = attn.ancestor_lists(mask.cpu())
    qpos = L + mask.sum(1).cpu() - 1
    return attn.packed_attention_exact_ref(q, k, v, torch.tensor([0]), torch.tensor([L]), anc, cnt,
                                           L + torch.arange(n), qpos, window=window)


def test_packed_exact_attention_kernel_matches_its_reference(triton_kernels):
    """A ragged batch in one flat cache: 3 sequences (prefixes of 5, 40 and 0 keys at their own
    bases) with trees of 3, 1 and 4 nodes packed into 8 query rows, rows in mixed order."""
    g = torch.Generator().manual_seed(5)
    hkv, G, D, S = 2, 2, 16, 64
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    k, v = torch.randn(hkv, 3 * S, D, generator=g), torch.randn(hkv, 3 * S, D, generator=g)
    seq = torch.tensor([1, 0, 2, 0, 2, 0, 2, 2])  # each query row's sequence
    pre_len = torch.tensor([5, 40, 0])[seq]
    pre_base = torch.tensor([0, S, 2 * S])[seq]
    # ancestors (query rows, depth order): seq 0 = rows 1, 3, 5 (3 and 5 children of 1), seq 1 = row 0,
    # seq 2 = rows 2, 4, 6, 7 (a chain 2 -> 4 -> 6 and 7 a child of 4)
    lists = {0: [0], 1: [1], 3: [1, 3], 5: [1, 5], 2: [2], 4: [2, 4], 6: [2, 4, 6], 7: [2, 4, 7]}
    anc = torch.full((8, 3), 8, dtype=torch.int32)
    for r, a in lists.items():
        anc[r, :len(a)] = torch.tensor(a)
    cnt = torch.tensor([len(lists[r]) for r in range(8)], dtype=torch.int32)
    written = {1: 0, 3: 1, 5: 2, 0: 0, 2: 0, 4: 1, 6: 2, 7: 3}  # index among its sequence's new tokens
    slots = torch.tensor([int(pre_base[r] + pre_len[r]) + written[r] for r in range(8)])
    qpos = pre_len + cnt.long() - 1
    q = torch.randn(8, hkv * G, D, generator=g)
    for window in (None, 4):
        want = attn.packed_attention_exact_ref(q, k, v, pre_base, pre_len, anc, cnt, slots, qpos, window=window)
        got = attn.packed_attention_exact(*(t.to(dev) for t in (q, k, v, pre_base, pre_len, anc, cnt, slots, qpos)),
                                          window=window)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
        perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])  # the same rows packed in another order
        inv = torch.argsort(perm)
        anc_p = torch.where(anc[perm] < 8, inv[anc[perm].long().clamp(max=7)], 8).to(torch.int32)
        moved = attn.packed_attention_exact(*(t.to(dev) for t in (q[perm], k, v, pre_base[perm], pre_len[perm], anc_p,
                                                                  cnt[perm], slots[perm], qpos[perm])), window=window)
        assert torch.equal(moved[inv].cpu(), got.cpu())  # bitwise: a row's result ignores its neighbours


def test_exact_attention_matches_the_reference_attention():
    g = torch.Generator().manual_seed(1)
    n, L, hkv, G, D = 6, 11, 2, 2, 16
    q = torch.randn(n, hkv * G, D, generator=g)
    k, v = torch.randn(hkv, 32, D, generator=g), torch.randn(hkv, 32, D, generator=g)
    mask = TokenTree(torch.zeros(n, dtype=torch.long), torch.tensor([-1, 0, 0, 1, -1, 4])).ancestor_mask
    for window in (None, 3):
        want = attn.tree_attention_ref(q, k, v, L, mask, window=window)
        got = _exact_ref(q, k, v, L, mask, window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_real_smollm2_bf16_speculative_equals_plain_in_exact_mode(smollm2, monkeypatch):
    """The chat prompt whose bf16 speculative output differs from plain decoding on this CPU
    without the exact mode (every drafter, at 32 tokens) matches it token for token with it."""
    import copy

    import specdec

    model, tok = smollm2
    monkeypatch.delenv("SPECDEC_EXACT", raising=False)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ids = tok.apply_chat_template([{"role": "user", "content": "Summarize in two sentences why the sky is blue."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    plain = specdec.generate(bf16, ids, max_new_tokens=24, backend="compact", exact=True)
    for name in ("ngram", "suffix"):
        out = specdec.generate(bf16, ids, drafter=specdec.drafters.make(name, target=bf16), max_new_tokens=24,
                               adaptive=False, backend="compact", exact=True)
        assert out.sequences.tolist() == plain.sequences.tolist(), name
        assert out.stats.steps < 24  # drafts were accepted: the verify ran many-node trees


@pytest.mark.parametrize("window", [None, 3])
def test_exact_attention_kernel_matches_its_reference(triton_kernels, window):
    g = torch.Generator().manual_seed(2)
    n, L, hkv, G, D = 7, 37, 2, 3, 24
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(n, hkv * G, D, generator=g).to(dev)
    k, v = torch.randn(hkv, 64, D, generator=g).to(dev), torch.randn(hkv, 64, D, generator=g).to(dev)
    mask = TokenTree(torch.zeros(n, dtype=torch.long), torch.tensor([-1, 0, 0, 1, -1, 4, 3])).ancestor_mask.to(dev)
    for m, start in ((mask, L), (attn.pack_tree_mask(mask), torch.tensor([L], device=dev)), (None, L)):
        want = _exact_ref(q, k, v, L, m, window)
        got = attn.tree_attention_exact(q, k, v, start, m, window=window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_mode_through_the_triton_kernels_is_bitwise_too(triton_kernels, monkeypatch, dtype):
    """The same property with every op on its Triton kernel (the interpreter on CPU)."""
    test_verify_rows_equal_one_token_steps_bitwise(monkeypatch, "llama", dtype)


def test_device_loop_in_exact_mode_equals_plain_decoding_in_bf16(monkeypatch):
    """bf16, the device loop on a static runner: speculative output (suffix + recycled trees of
    up to 33 rows) is token-identical to plain decoding in the exact mode."""
    import specdec
    from specdec.backends.cuda_graphs import GraphedCompactRunner
    from specdec.drafters.recycling import TreeTemplate

    monkeypatch.setenv("SPECDEC_EXACT", "1")
    model = tiny_model("llama", vocab=64).to(torch.bfloat16)
    runner = GraphedCompactRunner(CompactRunner.from_hf(model, max_length=128), mode="static")
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]])
    plain = specdec.generate(runner, ids, max_new_tokens=24)
    drafter = specdec.drafters.make("suffix+recycling", target=model, suffix={"num_candidates": 2, "depth": 4},
                                    recycling={"template": TreeTemplate.best_first(24, max_depth=4, k=4), "k": 4})
    out = specdec.generate(runner, ids, drafter=drafter, max_new_tokens=24)
    assert out.stats.loop == "device" and plain.stats.loop == "device"
    assert out.stats.steps < 24 and torch.equal(out.sequences, plain.sequences)


def test_exact_mode_defaults_and_overrides(monkeypatch):
    from specdec.ops import exact

    monkeypatch.delenv("SPECDEC_EXACT", raising=False)
    monkeypatch.setattr(exact, "DEFAULT_FOR_HALF_ON_CUDA", "on")
    assert exact.resolve(None, torch.bfloat16, "cuda") == "on"
    assert exact.resolve(None, torch.float16, "cuda:0") == "on"
    assert exact.resolve(None, torch.float32, "cuda") == "off"
    assert exact.resolve(None, torch.bfloat16, "cpu") == "off"
    assert exact.resolve(True, torch.float32, "cpu") == "on" and exact.resolve(False, torch.bfloat16, "cuda") == "off"
    monkeypatch.setenv("SPECDEC_EXACT", "0")
    assert exact.resolve(None, torch.bfloat16, "cuda") == "off" and exact.mode() == "off"
    with exact.scope("on"):
        assert exact.mode() == "on"
        with exact.scope(None):
            assert exact.mode() == "on"
    assert exact.mode() == "off"
    monkeypatch.setenv("SPECDEC_EXACT", "yes")
    with pytest.raises(ValueError, match="SPECDEC_EXACT"):
        exact.mode()
    with pytest.raises(ValueError, match="exact must be"):
        exact.resolve("sometimes", torch.float32, "cpu")


def test_generate_exact_option_bf16_speculative_equals_plain(monkeypatch):
    """``generate(exact=True)`` on the compact runtime, bf16 on CPU, no environment variable:
    the runner runs in the exact mode (a runner per mode is kept) and the speculative output
    equals plain decoding token for token."""
    import specdec

    monkeypatch.delenv("SPECDEC_EXACT", raising=False)
    model = tiny_model("llama", vocab=64).to(torch.bfloat16)
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]])
    plain = specdec.generate(model, ids, max_new_tokens=20, backend="compact", exact=True)
    out = specdec.generate(model, ids, drafter=specdec.drafters.make("ngram"), max_new_tokens=20,
                           backend="compact", exact=True)
    assert torch.equal(out.sequences, plain.sequences)
    from specdec.backends.select import as_runner

    assert as_runner(model, "compact", 64, exact=True).exact == "on"
    assert as_runner(model, "compact", 64).exact == "off"  # the default on CPU


def test_exact_option_where_it_cannot_be_honoured_is_an_error(monkeypatch):
    import specdec
    from specdec.backends.compact import CompactRunner

    monkeypatch.delenv("SPECDEC_EXACT", raising=False)
    model = tiny_model("llama", vocab=64)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="only the compact runtime"):
        specdec.generate(model, ids, max_new_tokens=2, backend="generic", exact=True)
    runner = CompactRunner.from_hf(model, max_length=32, exact=False)
    with pytest.raises(ValueError, match=r"exact mode 'off'.*CompactRunner.from_hf"):
        specdec.generate(runner, ids, max_new_tokens=2, exact=True)
    assert specdec.generate(runner, ids, max_new_tokens=2, exact=False).new_tokens.numel() == 2
