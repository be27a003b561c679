"""The feedback service's judging rules and statistics (pure functions)."""
from services.feedback.rules import labeller_agreement, rm_agreement, trl_row
from services.feedback.server import TokenBucket


def test_labeller_agreement_counts_pairs_of_judgments():
    by_pair = {1: [(10, "first"), (11, "first")],                 # agree
               2: [(10, "tie"), (11, "tie"), (12, "second")],      # 10-11 agree; 10-12, 11-12 do not
               3: [(11, "second"), (12, "first")]}                 # disagree
    everyone = labeller_agreement(by_pair)
    assert (everyone.compared, everyone.agreed, everyone.rate) == (5, 2, 0.4)
    ten = labeller_agreement(by_pair, labeller_id=10)  # only the comparisons that involve labeller 10
    assert (ten.compared, ten.agreed) == (3, 2)
    assert labeller_agreement({}).rate is None


def test_the_reward_model_agrees_when_it_scored_the_chosen_answer_higher():
    rows = [("first", 1.0, 0.0), ("second", 1.0, 0.0), ("second", 0.2, 0.7), ("first", 0.5, 0.5),
            ("tie", 1.0, 0.0), ("skip", 1.0, 0.0)]  # ties and skips say nothing
    a = rm_agreement(rows)
    assert (a.compared, a.agreed) == (4, 2.5)  # equal scores count half


def test_export_rows_keep_conversations_conversations():
    assert trl_row("2+2?", "4", "5") == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    chat = [{"role": "user", "content": "2+2?"}]
    assert trl_row(chat, "4", "5") == {"prompt": chat, "chosen": [{"role": "assistant", "content": "4"}],
                                       "rejected": [{"role": "assistant", "content": "5"}]}


def test_the_token_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=1.0, burst=3)
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take("a")
    assert 0.0 < wait <= 1.0
    assert bucket.take("b") == 0.0  # per key
