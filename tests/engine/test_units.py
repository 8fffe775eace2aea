"""Pure parts of the engine: slab and extent allocators, the sampler."""

from __future__ import annotations

import pytest
import torch
from aegaeon.gpu_worker.kv_cache import ExtentAllocator, OutOfBlocks, SlabAllocator
from aegaeon.gpu_worker.sampler import choose, finish_reason

from aegaeon.protocol import SamplingParams


def test_slabs_hold_one_block_size_each_and_return_when_empty():
    slabs = SlabAllocator(num_slabs=4, slab_elems=100)
    small = slabs.allocate(10, 12)  # 10 per slab: binds 2 slabs
    large = slabs.allocate(50, 3)  # 2 per slab: binds the other 2
    assert slabs.num_free_slabs == 0
    assert {o // 100 for o in small}.isdisjoint({o // 100 for o in large})
    assert not slabs.can_allocate(50, 2) and slabs.can_allocate(50, 1)
    slabs.free(10, small)
    assert slabs.num_free_slabs == 2
    assert slabs.num_free_blocks(50) == 5


def test_slab_allocator_refuses_more_blocks_than_it_has():
    slabs = SlabAllocator(num_slabs=1, slab_elems=64)
    with pytest.raises(OutOfBlocks):
        slabs.allocate(16, 5)


def test_extent_allocator_coalesces_freed_ranges():
    book = ExtentAllocator(4 * 4096)
    a, b, c = book.allocate(4096), book.allocate(5000), book.allocate(4096)
    assert (a, b, c) == (0, 4096, 3 * 4096)
    assert book.allocate(1) is None
    book.free(a, 4096)
    book.free(b, 5000)
    assert book.allocate(3 * 4096) == 0


def test_seeded_sampling_is_a_pure_function_of_seed_index_and_logits():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=42)
    first = [choose(logits, params, [0] * i, seed=42).token_id for i in range(20)]
    again = [choose(logits, params, [0] * i, seed=42).token_id for i in range(20)]
    other = [choose(logits, params, [0] * i, seed=43).token_id for i in range(20)]
    assert first == again and first != other


def test_top_k_one_equals_greedy_and_penalties_change_the_choice():
    logits = torch.tensor([0.0, 3.0, 2.5, 1.0])
    assert choose(logits, SamplingParams(temperature=0.7, top_k=1), [], seed=1).token_id == 1
    penalized = SamplingParams(temperature=0.0, presence_penalty=1.0)
    assert choose(logits, penalized, [1], seed=1).token_id == 2


def test_logprobs_report_the_chosen_token_and_the_top_n():
    logits = torch.tensor([0.0, 3.0, 2.5, 1.0])
    choice = choose(logits, SamplingParams(temperature=0.0, logprobs=2), [], seed=1)
    expected = torch.log_softmax(logits, -1)
    assert choice.logprob == pytest.approx(float(expected[1]))
    assert [t for t, _ in choice.top_logprobs] == [1, 2]


def test_finish_reason_is_stop_on_eos_or_stop_ids_and_length_at_max_tokens():
    params = SamplingParams(max_tokens=3, stop_token_ids=[9])
    assert finish_reason(9, 1, params, (2,)) == "stop"
    assert finish_reason(2, 1, params, (2,)) == "stop"
    assert finish_reason(2, 1, SamplingParams(ignore_eos=True), (2,)) is None
    assert finish_reason(5, 3, params, (2,)) == "length"


@pytest.mark.parametrize("aligned", [True, False])
def test_paged_kv_rows_round_trip_at_any_block_offset(aligned):
    from aegaeon.gpu_worker.paged_kv import PagedKV
    from aegaeon.gpu_worker.weights_loader import KVShape

    shape = KVShape(layers=2, kv_heads=3, head_dim=5)  # row of 15 elements
    region = torch.zeros(4000)
    kv = PagedKV(region, shape, block_size=4, aligned=aligned)
    offset = 15 * 7 if aligned else 13  # an unaligned block start needs the sliding window
    tables = [[offset, offset + kv.block_elems]]
    bases = kv.padded_bases(tables, [6])[0]
    k, v = torch.randn(6, 15), torch.randn(6, 15)
    kv.write(1, bases, k, v)
    got_k, got_v = kv.gather(1, bases)
    assert torch.equal(got_k.view(6, 15), k) and torch.equal(got_v.view(6, 15), v)
    assert int((region != 0).sum()) == 2 * 6 * 15  # nothing else written
