-- Named mutexes and worker loss.
--
-- An attempt of a step with `mutex = NAME` starts in state 'Waiting' and becomes 'Pending'
-- (publishable) only once the dispatcher holds the mutex's Redis lease for it. The fencing
-- token of that grant (epoch * 2^32 + counter) is recorded here and only ever grows; results
-- carrying a lower token are refused.
ALTER TABLE attempts ADD COLUMN mutex_token bigint;
ALTER TABLE attempts ADD COLUMN waiting_since timestamptz;
-- When the attempt last became 'Pending' (created, granted its mutex, or re-published): the
-- sweep re-publishes attempts left unconfirmed for a few seconds after that.
ALTER TABLE attempts ADD COLUMN pending_since timestamptz NOT NULL DEFAULT now();
CREATE INDEX attempts_waiting ON attempts (waiting_since) WHERE state = 'Waiting';
CREATE INDEX attempts_mutex_held ON attempts (step_run_id) WHERE mutex_token IS NOT NULL AND state IN ('Pending', 'Queued', 'Running');

-- The epoch of mutex fencing tokens: a new one whenever Redis is found empty (it keeps nothing
-- on disk), so tokens granted after a Redis restart exceed every token granted before.
CREATE SEQUENCE mutex_epochs START 1;

-- Why a worker was last declared lost, for the operator.
ALTER TABLE workers ADD COLUMN lost_at timestamptz;
