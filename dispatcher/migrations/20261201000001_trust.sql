-- Trust no agent (issue 13).

-- Each worker's own RabbitMQ user, created through the management API. Only the salted hash
-- of its password is kept (RabbitMQ's own `password_hash` format), so the dispatcher can
-- recreate the user if the broker lost it, but cannot log in as the worker.
ALTER TABLE workers
    ADD COLUMN broker_user          text UNIQUE,
    ADD COLUMN broker_password_hash text;

-- The sha256 (hex) of the job body published for the attempt's current job id: a claim for a
-- body that changed on its way runs nothing.
ALTER TABLE attempts ADD COLUMN job_sha256 text;

-- The broker user that published a stale event (its validated `user_id`), when known.
ALTER TABLE stale_events ADD COLUMN sender text;
