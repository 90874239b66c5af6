"""Human feedback collection: `rlhf-ray label` serves a local page where annotators judge candidate responses.

- `items`: what is labeled (a prompt and its candidates, with a stable id), from files or generated;
- `generate`: candidates written by a model through the project's vLLM generator;
- `judgements`: what the page sends, validated, and its reward-model rows;
- `store`: the append-only judgement log and the reward-model file `rlhf-ray rm` trains on;
- `server`: the FastAPI app and page; `summary`: counts, agreement between annotators, A/B win rate.
"""
