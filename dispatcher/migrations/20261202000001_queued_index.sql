-- The stray-job check looks every few seconds for attempts Queued longer than a grace; without
-- an index it read every attempt ever made. Queued attempts are few at any time.
CREATE INDEX attempts_queued ON attempts (queued_at) WHERE state = 'Queued';
