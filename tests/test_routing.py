"""Router, Sinkhorn balance, losses and gradient paths (tiny layouts, no diffusion model)."""

import math

import pytest
import torch

from aptp.routing import (
    PromptRouter,
    assignment_loss,
    code_size_loss,
    code_targets,
    contrastive_loss,
    resource_loss,
    sinkhorn,
    spherical_kmeans,
    spread_loss,
)
from aptp.routing.router import materialize
from aptp.units import MacsModel, UnitLayout, UnitSpec

UNITS = [
    UnitSpec("a:block", "resnet", 1),
    UnitSpec("a:groups", "groups", 8, element_size=2, parent="a:block"),
    UnitSpec("b:heads", "heads", 4, element_size=16),
    UnitSpec("c:ff", "ff", 6, element_size=8),
]


def tiny_router(num_codes=3, seed=0):
    torch.manual_seed(seed)
    return PromptRouter(units=UnitLayout(UNITS).to_dict(), num_codes=num_codes, prompt_dim=12, arch_dim=8,
                        hidden_dim=16, hyper_hidden_dim=16)


def tiny_macs(layout):
    per_unit = {"a:block": 5.0, "a:groups": 2.0, "b:heads": 3.0, "c:ff": 1.0}
    element = torch.cat([torch.full((u.count,), per_unit[u.name], dtype=torch.float64) for u in layout])
    parent = torch.tensor([-1] + [0] * 8 + [-1] * 10)
    return MacsModel(layout, fixed=20.0, element_macs=element, element_attention_macs=torch.zeros_like(element),
                     parent_index=parent)


def test_sinkhorn_balances_codes_even_for_collapsed_scores():
    scores = torch.zeros(12, 3)
    scores[:, 0] = 1.0  # every prompt prefers code 0
    scores += 0.01 * torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    q = sinkhorn(scores, epsilon=0.05, iterations=50)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))
    torch.testing.assert_close(q.sum(dim=0), torch.full((3,), 4.0), atol=1e-3, rtol=0)
    assert torch.bincount(q.argmax(dim=1), minlength=3).min() >= 3


def test_sinkhorn_keeps_clear_preferences():
    scores = torch.eye(3).repeat(4, 1)  # prompt i prefers code i % 3, already balanced
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert torch.equal(q.argmax(dim=1), torch.arange(12) % 3)


def test_sinkhorn_balance_softens_the_equal_shares():
    # 8 of 12 prompts clearly prefer code 0: equal shares give code 0 a third of the batch (4 prompts'
    # worth), a soft balance more, none the softmax of each row (almost all 8).
    scores = torch.zeros(12, 3)
    scores[:8, 0] = 0.5
    code_0 = {}
    for balance in (1.0, 0.5, 0.0):
        q = sinkhorn(scores, epsilon=0.05, iterations=3, balance=balance)
        torch.testing.assert_close(q.sum(dim=1), torch.ones(12))
        code_0[balance] = q[:8, 0].sum().item()
    assert code_0[1.0] == pytest.approx(4.0, abs=0.05)
    assert code_0[1.0] + 2 < code_0[0.5] < code_0[0.0] == pytest.approx(8.0, abs=0.01)
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3, balance=0.0), torch.softmax(scores / 0.05, dim=1))
    with pytest.raises(ValueError, match="balance"):
        sinkhorn(scores, balance=1.5)


def _three_clusters(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """60 points in 3 tight clusters of unequal size (30, 20, 10) around random directions in 16 dims."""
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=generator), dim=1)
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    return centres[labels] + 0.05 * torch.randn(60, 16, generator=generator), labels


def test_spherical_kmeans_finds_the_clusters():
    points, labels = _three_clusters(torch.Generator().manual_seed(0))
    for seed in range(5):
        centroids = spherical_kmeans(points, 3, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))
        found = (points @ centroids.t()).argmax(dim=1)
        # Each true cluster maps to exactly one centroid, and no two clusters share one.
        assert all(len(set(found[labels == c].tolist())) == 1 for c in range(3))
        assert len(set(found.tolist())) == 3
    again = spherical_kmeans(points, 3, torch.Generator().manual_seed(4))
    assert torch.equal(again, spherical_kmeans(points, 3, torch.Generator().manual_seed(4)))
    # More centroids than distinct points: the emptied ones take a point each instead of staying empty.
    duplicates = points[:2].repeat(5, 1)
    assert torch.isfinite(spherical_kmeans(duplicates, 3, torch.Generator().manual_seed(0))).all()
    with pytest.raises(ValueError, match="N >= k"):
        spherical_kmeans(points[:2], 3)


def test_router_codes_clustered_on_its_prompts_route_each_cluster_to_one_code():
    generator = torch.Generator().manual_seed(0)
    prompts, labels = _three_clusters(generator)
    prompts = prompts[:, :12]  # the tiny router's prompt width
    router = tiny_router()
    router.cluster_codes(prompts, generator)
    routes = router.route(prompts)
    assert all(len(set(routes[labels == c].tolist())) == 1 for c in range(3))
    assert len(set(routes.tolist())) == 3


def test_resource_loss_matches_hand_computation():
    fractions = torch.tensor([0.5, 0.7, 0.9])  # mean 0.7
    assert resource_loss(fractions, 0.6).item() == pytest.approx(abs(math.log(0.7 / 0.6)))
    assert resource_loss(torch.tensor([0.3, 0.9]), 0.6).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="budget"):
        resource_loss(fractions, 1.5)


def test_assignment_and_contrastive_losses():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = -torch.log_softmax(scores / 0.1, dim=1)[0, 0].item()
    assert assignment_loss(scores, q, 0.1).item() == pytest.approx(expected)
    z = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    # The same geometry in another space costs nothing; a scrambled one costs more.
    rotation = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(2)))[0]
    assert contrastive_loss(z @ rotation, z).item() == pytest.approx(0.0, abs=1e-5)
    assert contrastive_loss(z[torch.randperm(6, generator=torch.Generator().manual_seed(3))], z).item() > 0.1


def test_router_starts_dense_and_routes_deterministically():
    router = tiny_router()
    probabilities = router.gate_probabilities()
    assert probabilities.shape == (3, 19) and (probabilities > 0.9).all()
    z = torch.randn(5, 12, generator=torch.Generator().manual_seed(4))
    together = router.route(z)
    one_by_one = torch.cat([router.route(z[i:i + 1]) for i in range(5)])
    assert torch.equal(together, one_by_one)


def test_task_losses_reach_the_predictor_and_codes():
    """L_resource (standing in for any loss computed from the gates) must give the predictor a gradient."""
    router = tiny_router()
    macs = tiny_macs(router.layout)
    z = torch.randn(6, 12, generator=torch.Generator().manual_seed(5))
    scores = router.scores(router.embed(z))
    assignment = sinkhorn(scores).argmax(dim=1)
    gates = router.mix(scores, assignment, router.sample_gates(generator=torch.Generator().manual_seed(6)))
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    loss = resource_loss(macs.fraction(gates.double()).float(), budget=0.5)
    loss.backward()
    assert router.predictor[0].weight.grad.abs().sum() > 0
    assert router.codes.grad.abs().sum() > 0
    assert router.hypernet[-1].weight.grad.abs().sum() > 0


def test_materialize_thresholds_and_rounds():
    layout = UnitLayout(UNITS)
    p = torch.zeros(layout.num_elements)
    p[layout.slice_of("a:block")] = 0.9
    p[layout.slice_of("a:groups")] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55, 0.1, 0.2, 0.3])  # 5 above 0.5
    p[layout.slice_of("b:heads")] = torch.tensor([0.1, 0.7, 0.2, 0.3])
    p[layout.slice_of("c:ff")] = 0.0  # nothing kept -> at least one
    architecture = materialize(p, layout, channel_multiple=8)
    assert architecture["a:block"] == [0]
    assert architecture["a:groups"] == [0, 1, 2, 3]  # groups of 2 channels go in fours
    assert architecture["b:heads"] == [1]
    assert len(architecture["c:ff"]) == 1
    p[layout.slice_of("a:block")] = 0.2
    assert materialize(p, layout)["a:block"] == []


def test_router_saves_and_loads(tmp_path):
    router = tiny_router()
    with torch.no_grad():
        router.hypernet[-1].bias.normal_()
    router.save_pretrained(tmp_path)
    loaded = PromptRouter.from_pretrained(tmp_path)
    z = torch.randn(4, 12, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loaded.route(z), router.route(z))
    assert torch.equal(loaded.gate_probabilities(), router.gate_probabilities())
    assert loaded.expert_architectures() == router.expert_architectures()


def test_noise_free_gates_are_the_materialised_experts():
    router = tiny_router()
    with torch.no_grad():
        router.hypernet[-1].bias.normal_(std=4.0, generator=torch.Generator().manual_seed(8))
    gates = router.sample_gates(0.3, torch.Generator().manual_seed(9), noise_scale=0.0)
    expected = (router.gate_probabilities() > 0.5).float()
    assert torch.equal(gates.detach(), expected)
    noisy = router.sample_gates(0.3, torch.Generator().manual_seed(9), noise_scale=1.0)
    assert not torch.equal(noisy.detach(), expected)


def floored_router(min_width):
    torch.manual_seed(0)
    router = PromptRouter(units=UnitLayout(UNITS).to_dict(), num_codes=2, prompt_dim=12, arch_dim=8, hidden_dim=16,
                          hyper_hidden_dim=16, min_width=min_width)
    with torch.no_grad():  # every width gate well below 0.5: without floors each unit keeps one element
        router.hypernet[-1].bias.copy_(torch.linspace(-9.0, -6.0, router.layout.num_elements))
    return router


def test_width_floors_keep_the_highest_ranked_elements_in_training_and_in_experts():
    router = floored_router({"heads": 0.5, "ff": 0.5})
    layout = router.layout
    gates = router.sample_gates(0.5, torch.Generator().manual_seed(0), noise_scale=0.0)
    heads, ff = gates[:, layout.slice_of("b:heads")], gates[:, layout.slice_of("c:ff")]
    assert heads.sum(1).tolist() == [2.0, 2.0] and ff.sum(1).tolist() == [3.0, 3.0]
    assert heads[0].tolist() == [0.0, 0.0, 1.0, 1.0]  # the two highest logits of the unit
    assert gates[:, layout.slice_of("a:groups")].sum().item() == 0.0  # no floor on groups
    experts = router.expert_architectures()
    assert experts[0]["b:heads"] == [2, 3] and experts[0]["c:ff"] == [3, 4, 5]
    assert len(experts[0]["a:groups"]) == 4  # the rounding minimum of 2-channel groups, no floor
    # Every element, kept by the floor or not, passes gradient: the task losses rank them all.
    gates.sum().backward()
    assert (router.hypernet[-1].bias.grad[layout.slice_of("b:heads")] != 0).all()


def test_width_floors_reject_unknown_kinds_and_bad_fractions():
    with pytest.raises(ValueError, match="unknown width kind"):
        floored_router({"resnet": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        floored_router({"heads": 1.5})


def test_code_targets_follow_difficulty_and_keep_the_average_at_the_budget():
    share = torch.tensor([0.25, 0.25, 0.5])
    targets = code_targets(torch.tensor([2.0, 1.0, 1.0]), share, budget=0.5, exponent=1.0)
    assert (share * targets).sum().item() == pytest.approx(0.5, abs=1e-6)
    assert targets[0] > targets[1] == pytest.approx(targets[2].item())
    assert targets[0].item() == pytest.approx(2 * targets[1].item(), rel=1e-5)
    flat = code_targets(torch.tensor([2.0, 1.0, 1.0]), share, budget=0.6, exponent=0.0)
    torch.testing.assert_close(flat, torch.full((3,), 0.6))
    capped = code_targets(torch.tensor([10.0, 1.0, 1.0]), share, budget=0.6, exponent=1.0, max_fraction=0.9)
    assert capped[0].item() == pytest.approx(0.9)
    assert (share * capped).sum().item() == pytest.approx(0.6, abs=1e-5)


def test_code_size_and_spread_losses():
    fractions = torch.tensor([0.5, 0.8], requires_grad=True)
    size = code_size_loss(fractions, torch.tensor([0.5, 0.4]))
    assert size.item() == pytest.approx(math.log(2) / 2)
    spread = spread_loss(fractions, cap=0.7)
    assert spread.item() == pytest.approx(-fractions.detach().std().item() + 0.3)
    spread.backward()
    # Above the cap only the std term acts: it still pushes the codes apart.
    assert fractions.grad[1] < 0 < fractions.grad[0]
    assert spread_loss(torch.tensor([0.6])).item() == 0.0
