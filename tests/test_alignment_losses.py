"""Alignment objectives against closed forms computed independently here, in plain Python floats."""

import math

import pytest
import torch

from mmfm.train.alignment_losses import (GrpoOutput, PreferenceOutput, dpo_loss, group_advantages, grpo_loss,
                                         ipo_loss, log_odds, orpo_loss, preference_loss, sequence_logprobs,
                                         simpo_loss, token_logprobs)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def t(values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def close(tensor, expected, tol=1e-10):
    got = tensor.detach().flatten().tolist() if isinstance(tensor, torch.Tensor) else [tensor]
    expected = expected if isinstance(expected, list) else [expected]
    assert got == pytest.approx(expected, rel=tol, abs=tol), (got, expected)


# Two preference pairs: summed log-probs of policy and reference, and answer lengths.
PC, PR = [-12.0, -20.0], [-15.0, -18.0]
RC, RR = [-13.0, -19.0], [-14.0, -19.5]
LC, LR = [4, 10], [6, 8]


# ---------------------------------------------------------------------------------------------- sequence_logprobs


def test_sequence_logprobs_matches_manual_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    targets = torch.randint(0, 7, (3, 5))
    targets[0, :2] = -100
    targets[1, 4] = -100
    targets[2, :] = -100  # a row with nothing to score
    sums, counts = sequence_logprobs(logits, targets)
    for b in range(3):
        total, n = 0.0, 0
        for pos in range(5):
            y = int(targets[b, pos])
            if y == -100:
                continue
            row = logits[b, pos].tolist()
            top = max(row)
            total += row[y] - top - math.log(sum(math.exp(v - top) for v in row))
            n += 1
        close(sums[b], total, 1e-5)
        assert int(counts[b]) == n
    assert sums.dtype == torch.float32 and counts.tolist() == [3, 4, 0]


def test_sequence_logprobs_fp32_from_bf16_and_no_grad_at_ignored():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6).bfloat16().requires_grad_()
    targets = torch.tensor([[1, -100, 3, 5], [-100, -100, 0, 2]])
    sums, _ = sequence_logprobs(logits, targets)
    assert sums.dtype == torch.float32
    ref = torch.log_softmax(logits.detach().float(), -1)
    close(sums[0], float(ref[0, 0, 1] + ref[0, 2, 3] + ref[0, 3, 5]), 1e-6)
    sums.sum().backward()
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[1, :2].abs().sum() == 0
    assert token_logprobs(logits, targets)[1, :2].tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------------------- DPO


def dpo_reference(beta, eps):
    """Per-pair loss, d loss_i / d pc_i, and rewards, by hand."""
    out = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        h = beta * ((pc - rc) - (pr - rr))
        loss = -(1 - eps) * logsig(h) - eps * logsig(-h)
        grad = -beta * (1 - eps) * sig(-h) + beta * eps * sig(h)
        out.append((loss, grad, beta * (pc - rc), beta * (pr - rr)))
    return out


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1.0, 0.5)])
def test_dpo_value_gradient_and_rewards(beta, eps):
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    out = dpo_loss(pc, pr, t(RC), t(RR), beta=beta, label_smoothing=eps)
    assert isinstance(out, PreferenceOutput)
    ref = dpo_reference(beta, eps)
    close(out.loss, sum(r[0] for r in ref) / 2)
    out.loss.backward()
    close(pc.grad, [r[1] / 2 for r in ref])
    close(pr.grad, [-r[1] / 2 for r in ref])  # h depends on pr with the opposite sign
    close(out.chosen_rewards, [r[2] for r in ref])
    close(out.rejected_rewards, [r[3] for r in ref])
    close(out.margin, sum(r[2] - r[3] for r in ref) / 2)
    # pair 0: chosen reward 0.1*1 > rejected 0.1*(-1); pair 1: -0.1 < 0.15
    close(out.accuracy, 0.5)
    assert not out.chosen_rewards.requires_grad and not out.margin.requires_grad


def test_dpo_reference_gets_no_gradient_and_validates_eps():
    rc = t(RC, grad=True)
    dpo_loss(t(PC, grad=True), t(PR), rc, t(RR)).loss.backward()
    assert rc.grad is None
    with pytest.raises(ValueError):
        dpo_loss(t(PC), t(PR), t(RC), t(RR), label_smoothing=0.6)


def test_cdpo_registry_default_and_eps0_equals_dpo():
    args = dict(policy_chosen=t(PC), policy_rejected=t(PR), ref_chosen=t(RC), ref_rejected=t(RR), beta=0.3)
    dpo = preference_loss("dpo", **args)
    close(preference_loss("cdpo", label_smoothing=0.0, **args).loss, float(dpo.loss))
    close(preference_loss("cdpo", **args).loss, sum(r[0] for r in dpo_reference(0.3, 0.1)) / 2)
    assert float(preference_loss("cdpo", **args).loss) != pytest.approx(float(dpo.loss))


def test_registry_unknown_name_lists_known():
    with pytest.raises(ValueError, match="cdpo.*dpo.*ipo.*orpo.*simpo"):
        preference_loss("kto", policy_chosen=t(PC))


# ----------------------------------------------------------------------------------------------------------- IPO


@pytest.mark.parametrize("lengths", [False, True])
def test_ipo_value_gradient_and_rewards(lengths):
    beta = 0.25
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    kw = dict(chosen_len=torch.tensor(LC), rejected_len=torch.tensor(LR)) if lengths else {}
    out = ipo_loss(pc, pr, t(RC), t(RR), beta=beta, **kw)
    losses, grads, cr, rr_ = [], [], [], []
    for i in range(2):
        lc, lr = (LC[i], LR[i]) if lengths else (1, 1)
        a, b = (PC[i] - RC[i]) / lc, (PR[i] - RR[i]) / lr
        u = a - b - 1 / (2 * beta)
        losses.append(u * u)
        grads.append(2 * u / lc)
        cr.append(beta * a)
        rr_.append(beta * b)
    close(out.loss, sum(losses) / 2)
    out.loss.backward()
    close(pc.grad, [g / 2 for g in grads])
    close(out.chosen_rewards, cr)
    close(out.rejected_rewards, rr_)
    close(out.accuracy, sum(c > r for c, r in zip(cr, rr_)) / 2)


def test_ipo_with_lengths_hand_value():
    # pair 0 only: a = 1/4, b = -1/6, u = 0.25 + 1/6 - 2 (beta=0.25) -> loss = u^2
    out = ipo_loss(t(PC[:1]), t(PR[:1]), t(RC[:1]), t(RR[:1]), beta=0.25, chosen_len=4, rejected_len=6)
    close(out.loss, (0.25 + 1 / 6 - 2) ** 2)
    with pytest.raises(ValueError):
        ipo_loss(t(PC), t(PR), t(RC), t(RR), chosen_len=torch.tensor(LC))


# --------------------------------------------------------------------------------------------------------- SimPO


def test_simpo_value_gradient_and_rewards():
    beta, gamma = 2.0, 0.5
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    out = simpo_loss(pc, pr, torch.tensor(LC), torch.tensor(LR), beta=beta, gamma=gamma)
    z = [beta * PC[i] / LC[i] - beta * PR[i] / LR[i] - gamma for i in range(2)]
    close(out.loss, sum(-logsig(v) for v in z) / 2)
    out.loss.backward()
    close(pc.grad, [-sig(-z[i]) * beta / LC[i] / 2 for i in range(2)])
    close(pr.grad, [sig(-z[i]) * beta / LR[i] / 2 for i in range(2)])
    close(out.chosen_rewards, [beta * PC[i] / LC[i] for i in range(2)])
    close(out.rejected_rewards, [beta * PR[i] / LR[i] for i in range(2)])
    # rewards: pair 0 -6 vs -5, pair 1 -4 vs -4.5
    close(out.accuracy, 0.5)
    close(out.margin, ((-6 + 5) + (-4 + 4.5)) / 2)
    close(preference_loss("simpo", policy_chosen=t(PC), policy_rejected=t(PR), chosen_len=torch.tensor(LC),
                          rejected_len=torch.tensor(LR)).loss, out.loss.item())


# ---------------------------------------------------------------------------------------------------------- ORPO


def test_log_odds_matches_definition():
    for l in [-5.0, -1.0, -0.7, -0.69, -0.3, -1e-3, -1e-6]:
        p = math.exp(l)
        close(log_odds(t([l])), math.log(p / (1 - p)), 1e-9)
    assert torch.isfinite(log_odds(torch.tensor([0.0, -1e-30]))).all()  # probability 1: clamped, finite


def test_orpo_value_gradient_and_rewards():
    lam = 0.2
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    nll = t(1.7, grad=True)
    out = orpo_loss(pc, pr, torch.tensor(LC), torch.tensor(LR), nll, lam=lam)
    losses, grads, cr, rr_ = [], [], [], []
    for i in range(2):
        lc, lr = PC[i] / LC[i], PR[i] / LR[i]
        pcp, prp = math.exp(lc), math.exp(lr)
        d = math.log(pcp / (1 - pcp)) - math.log(prp / (1 - prp))
        losses.append(1.7 - lam * logsig(d))
        grads.append(-lam * sig(-d) / (1 - pcp) / LC[i])  # d log-odds / dl = 1 / (1 - p)
        cr.append(lam * lc)
        rr_.append(lam * lr)
    close(out.loss, sum(losses) / 2)
    out.loss.backward()
    close(pc.grad, [g / 2 for g in grads])
    close(nll.grad, 1.0)
    close(out.chosen_rewards, cr)
    close(out.rejected_rewards, rr_)
    close(out.accuracy, 0.5)  # mean log-probs: -3 < -2.5, -2 > -2.25


# ---------------------------------------------------------------------------------------------------------- GRPO


def test_group_advantages_known_groups():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.7, 0.7, 0.7, 0.7]), group_size=4)
    close(adv[:4], [0.5 / (0.5 + 1e-4) * s for s in (1, -1, -1, 1)], 1e-6)
    assert adv[4:].tolist() == [0.0] * 4  # all-equal group: exactly 0
    close(group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), 4, eps=0.0), [1.0, -1.0, -1.0, 1.0], 1e-6)
    r = [3.0, 1.0, 2.0]
    mean = sum(r) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)  # population std
    close(group_advantages(torch.tensor(r), 3), [(x - mean) / (std + 1e-4) for x in r], 1e-6)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 2)


# Two completions of four tokens; the last token of row 1 is padding (garbage log-probs there).
LOGP = [[-1.0, -0.5, -2.0, -0.2], [-0.3, -1.2, -0.8, float("nan")]]
OLD = [[-1.3, -0.5, -1.0, -0.25], [-0.3, -0.9, -1.5, 5.0]]
REF = [[-1.1, -0.7, -1.5, -0.2], [-0.2, -1.0, -1.0, float("inf")]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]
ADV = [1.5, -0.8]


def grpo_reference(eps, c):
    """Loss, d loss / d logp per token, mean KL and clip fraction, by hand."""
    objs, grads, kls, clipped, n_tok = [], [], [], 0, 0
    for i in range(2):
        n = sum(MASK[i])
        obj, kl_sum, g_row = 0.0, 0.0, []
        for k in range(4):
            if not MASK[i][k]:
                g_row.append(0.0)
                continue
            a, lp = ADV[i], LOGP[i][k]
            r = math.exp(lp - OLD[i][k])
            rc = min(max(r, 1 - eps), 1 + eps)
            clip_active = rc * a < r * a
            kl = math.exp(REF[i][k] - lp) - (REF[i][k] - lp) - 1
            obj += min(r * a, rc * a) - c * kl
            kl_sum += kl
            clipped += clip_active
            n_tok += 1
            d_surr = 0.0 if clip_active else r * a
            d_kl = 1 - math.exp(REF[i][k] - lp)
            g_row.append(-(d_surr - c * d_kl) / n / 2)
        objs.append(obj / n)
        kls.append(kl_sum / n)
        grads.append(g_row)
    return -sum(objs) / 2, grads, sum(kls) / 2, clipped / n_tok


@pytest.mark.parametrize("c", [0.0, 0.04, 0.5])
def test_grpo_value_gradient_kl_and_clip_fraction(c):
    logp = t(LOGP, grad=True)
    out = grpo_loss(logp, t(OLD), t(REF), t(ADV), torch.tensor(MASK), clip_eps=0.2, kl_coef=c)
    assert isinstance(out, GrpoOutput)
    loss, grads, kl, clip_fraction = grpo_reference(0.2, c)
    # ratios: row 0 e^0.3 > 1.2 with A > 0 and row 1 e^-0.3 < 0.8 with A < 0 are clipped; row 0 e^-1 (A > 0) and
    # row 1 e^0.7 (A < 0) are outside the range but unclipped (the pessimistic min keeps them).
    assert clip_fraction == pytest.approx(2 / 7)
    close(out.loss, loss)
    close(out.kl, kl)
    close(out.clip_fraction, clip_fraction)
    assert out.n_sequences == 2
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()
    close(logp.grad, [g for row in grads for g in row])
    if c == 0:  # clipped tokens: no surrogate gradient
        assert logp.grad[0, 0] == 0 and logp.grad[1, 1] == 0


def test_grpo_gradient_sign_follows_advantage():
    for a in (1.0, -1.0):
        logp = t([[-1.0, -2.0]], grad=True)
        grpo_loss(logp, t([[-1.05, -1.9]]), t([[-1.0, -2.0]]), t([a]), torch.ones(1, 2)).loss.backward()
        # gradient descent moves logp by -grad: up for a positive advantage, down for a negative one
        assert ((-logp.grad) * a > 0).all()


def test_grpo_kl_estimator_nonnegative_and_zero_at_reference():
    torch.manual_seed(0)
    logp = torch.randn(4, 6, dtype=torch.float64) - 2
    ones = torch.ones(4, 6)
    out = grpo_loss(logp, logp, logp, torch.zeros(4), ones)
    assert float(out.kl) == 0.0 and out.loss.detach().item() == 0.0
    for _ in range(5):
        ref = logp + torch.randn_like(logp) * 3
        assert float(grpo_loss(logp, logp, ref, torch.zeros(4), ones).kl) > 0
    for gap in [-5.0, -0.1, 0.0, 0.1, 5.0]:
        kl = grpo_loss(t([[0.0]]), t([[0.0]]), t([[gap]]), t([0.0]), torch.ones(1, 1)).kl
        close(kl, math.exp(gap) - gap - 1)
        assert float(kl) >= 0


def test_grpo_masked_tokens_ignored_and_empty_row():
    logp = t(LOGP, grad=True)
    base = grpo_loss(logp, t(OLD), t(REF), t(ADV), torch.tensor(MASK))
    other = [row[:] for row in LOGP]
    other[1][3] = -123.0  # change only the masked token
    again = grpo_loss(t(other), t(OLD), t(REF), t(ADV), torch.tensor(MASK))
    close(again.loss, base.loss.item())
    base.loss.backward()
    assert logp.grad[1, 3] == 0

    # a third, fully masked row (garbage values): no NaN, and it does not count in the mean
    logp3 = t(LOGP + [[float("nan")] * 4], grad=True)
    out = grpo_loss(logp3, t(OLD + [[0.0] * 4]), t(REF + [[float("inf")] * 4]), t(ADV + [2.0]),
                    torch.tensor(MASK + [[0] * 4]))
    close(out.loss, base.loss.item())
    assert out.n_sequences == 2
    out.loss.backward()
    assert torch.isfinite(logp3.grad).all() and logp3.grad[2].abs().sum() == 0

    none = grpo_loss(t([[1.0, 2.0]], grad=True), t([[0.0, 0.0]]), t([[0.0, 0.0]]), t([1.0]), torch.zeros(1, 2))
    assert none.loss.item() == 0.0 and float(none.kl) == 0.0 and none.n_sequences == 0
    none.loss.backward()


def test_grpo_on_policy_gradient_is_reinforce():
    """old == logp and kl_coef = 0: grad = -(1/N) sum_i A_i / |o_i| sum_t d logp_it (policy gradient)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, 3:] = -100
    targets[2, :1] = -100
    mask = targets != -100
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5]), 3).double()
    logp = token_logprobs(logits, targets)
    out = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, kl_coef=0.0)
    (grad,) = torch.autograd.grad(out.loss, logits)

    # direct check on d loss / d logp, by hand
    logp_leaf = logp.detach().clone().requires_grad_()
    grpo_loss(logp_leaf, logp.detach(), logp.detach(), adv, mask, kl_coef=0.0).loss.backward()
    n = mask.sum(1).tolist()
    expected = [[-float(adv[i]) / n[i] / 3 if mask[i, k] else 0.0 for k in range(5)] for i in range(3)]
    close(logp_leaf.grad, [g for row in expected for g in row])

    # and through the logits, against the REINFORCE surrogate written out
    surrogate = 0.0
    for i in range(3):
        for k in range(5):
            if mask[i, k]:
                lsm = torch.log_softmax(logits[i, k], -1)[targets[i, k]]
                surrogate = surrogate - float(adv[i]) / n[i] * lsm / 3
    (expected_grad,) = torch.autograd.grad(surrogate, logits)
    assert torch.allclose(grad.double(), expected_grad, atol=1e-6)
    assert out.loss.detach().item() == pytest.approx(-float(adv.mean()), abs=1e-6)  # ratio 1: loss = -mean(A)
