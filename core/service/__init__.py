"""The domain logic of the Steer service, free of HTTP and of any queue.

`api/` routes and `workers/` tasks are thin adapters over these modules:

* `context`      - `ServiceContext`: settings, database sessions, blob store, the base model;
* `api_keys`, `admin_key` - who is calling;
* `users`, `samples`      - onboarding data and the right to be forgotten;
* `jobs`, `hyperparameters`, `training_job`, `retrain`, `executor` - training jobs;
* `registry`, `model_ids` - trained prefix versions and the model ids that name them.
"""
