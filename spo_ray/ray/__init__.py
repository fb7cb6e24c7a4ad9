"""The Ray engine, one module per role (OpenRLHF-style: one actor group per role, explicit placement).

| module | role |
|---|---|
| ``coordination`` | PolicyStore (versions, the staleness gate, rollback) and RoundLedger (each scored prompt once) |
| ``workers`` | sampler and scorer actors (Ray Data actor pools), the validation renderer |
| ``stream`` | plan rows -> samplers -> scorers -> streaming_split; waiting for a whole round |
| ``routing`` | each trainer rank receives the transition rows its micro-batches use, peer to peer |
| ``metrics`` | the roles' counters and the round's gauges as Ray metrics (Prometheus) |
| ``deepspeed_learner`` | the DeepSpeed learner (ZeRO 0-3) and the DeepSpeed config |
| ``trainer`` | one Ray Train worker: set-up, then the round loop |
| ``driver`` | ``run_on_ray``: preflight, actors, the TorchTrainer, accounting |
| ``common`` | what every Ray app shares: trainer resources and process group, splits, worker set-up |

Importing this package imports nothing heavy; import the module you need.
"""
