# %% [markdown]
# # smartmsg from a notebook
#
# A researcher's tour of the `smartmsg` Python package: simulate a campaign,
# read and replay its log, evaluate domain policies off-policy on it,
# evaluate a target on Open-Bandit-style logged feedback, and drive a
# policy batch by batch. Each cell runs as is in Jupyter; CI runs the
# whole file as a script (`scripts/python-test.sh`), so every assertion
# here is checked.
#
# Build and install the package first (README, "Python package").

# %%
import tempfile

import numpy as np
import pandas as pd

import smartmsg

data_dir = tempfile.mkdtemp(prefix="smartmsg-notebook-")

# %% [markdown]
# ## Simulate
# The small scenario (2,000 subscribers, 3 creatives), two policies, kept in
# `data_dir` so that the logs can be read afterwards. In a notebook a
# progress bar shows when tqdm is installed.

# %%
sim = smartmsg.simulate("small", policies=["random", "integrated"], seed=7, data_dir=data_dir)
print(sim.summary.to_string(index=False))
curve = sim.batches.pivot(index="batch", columns="policy", values="cumulative_expected")
print(curve.round(1).to_string())
assert (sim.summary.violations == 0).all()

# %% [markdown]
# ## Read and replay the logs

# %%
events = smartmsg.read_log(f"{data_dir}/random")
print(events.kind.value_counts().to_string())
planned = events[events.kind == "BatchPlanned"][["batch", "policy", "timestamp"]]
print(planned.head().to_string(index=False))

replayed = smartmsg.replay(data_dir)
print(replayed.campaigns[["source", "stream", "status", "batches_sent", "messages_planned", "reactions"]].to_string(index=False))
assert replayed.ok, replayed.violations

# %% [markdown]
# ## Off-policy evaluation of domain policies on the random policy's log
# Per row: each target's creative choice on the logged users. The simulator
# knows the truth, so `true_value` is there to compare with.

# %%
est = smartmsg.evaluate(
    f"{data_dir}/random", ["integrated", "creative-thompson"], ["ipw", "snipw", "dr"],
    scenario="small", scenario_seed=7, bootstrap=200, draws=10,
)
print(est.round(4).to_string(index=False))
assert np.isfinite(est.value).all() and (est.ci_low <= est.ci_high).all()

# %% [markdown]
# ## Logged bandit feedback in Open Bandit Pipeline's layout
# `bandit_feedback` with `action`, `reward`, `pscore`, `context`, `position`,
# `n_actions`; the target is obp's `action_dist` of shape
# (rows, actions, positions).

# %%
rng = np.random.default_rng(0)
n, k, positions = 20_000, 10, 3
context = rng.normal(size=(n, 4))
action = rng.integers(0, k, n)
position = rng.integers(0, positions, n)
p_click = 1 / (1 + np.exp(-(-2.0 + 0.5 * context[:, 0] + 0.05 * action)))
bandit_feedback = dict(
    action=action, position=position, reward=rng.binomial(1, p_click).astype(float),
    pscore=np.full(n, 1 / k), context=context, n_actions=k,
)
# The target favours high actions at every position.
prefs = np.exp(0.3 * np.arange(k))
action_dist = np.broadcast_to((prefs / prefs.sum())[None, :, None], (n, k, positions)).copy()
ope = smartmsg.evaluate(bandit_feedback, action_dist, ["dm", "ipw", "snipw", "dr"], bootstrap=300, seed=1)
print(ope.round(4).to_string(index=False))
# IPW by hand, for comparison.
w = action_dist[np.arange(n), action, position] / bandit_feedback["pscore"]
assert abs(ope.set_index("estimator").loc["IPW", "value"] - np.mean(w * bandit_feedback["reward"])) < 1e-12

# %% [markdown]
# ## A policy, batch by batch
# The integrated policy plans over candidates (with the propensity of each
# decision) and learns from the outcomes; here the outcomes come from a
# made-up truth.

# %%
users = pd.DataFrame(rng.normal(size=(5_000, 3)).astype(np.float32), columns=["x_0", "x_1", "x_2"])
users.insert(0, "user_id", np.arange(len(users)))
truth = 1 / (1 + np.exp(-(-2.5 + 1.5 * users.x_0.to_numpy()[:, None] * np.array([-1.0, 0.0, 1.0]))))
policy = smartmsg.Policy("integrated", creatives=3, dim=3, seed=3)
left = users
rates = []
for batch in range(4):
    plan = policy.plan(left, budget=500, batch_count=4)
    reacted = rng.binomial(1, truth[plan.user_id.to_numpy(), plan.creative.to_numpy()])
    rates.append(reacted.mean())
    chosen = users.set_index("user_id").loc[plan.user_id]
    policy.update(pd.DataFrame({"creative": plan.creative.to_numpy(), "reacted": reacted, **{c: chosen[c].to_numpy() for c in ["x_0", "x_1", "x_2"]}}))
    left = left[~left.user_id.isin(plan.user_id)]
print("reaction rate per batch:", np.round(rates, 3))
assert rates[-1] > rates[0]

# %%
import shutil

shutil.rmtree(data_dir)
