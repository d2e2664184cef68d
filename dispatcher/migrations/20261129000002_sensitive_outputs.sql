-- Sensitive output variables are sealed like sensitive task variables (XChaCha20-Poly1305
-- under secrets.key); `value` stays NULL for them.
ALTER TABLE output_variables ADD COLUMN sealed bytea;
