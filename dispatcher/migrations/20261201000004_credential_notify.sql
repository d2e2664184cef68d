-- Nodes remember the credentials they have looked up (dispatcher/src/credentials.rs) and
-- forget them all on this notification: any change that could make a remembered answer wrong.
CREATE FUNCTION gantry_credentials_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gantry_credentials', '');
    RETURN NULL;
END $$;

CREATE TRIGGER api_keys_changed AFTER DELETE OR UPDATE OF key_hash, permissions ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION gantry_credentials_changed();

CREATE TRIGGER workers_deleted AFTER DELETE ON workers
    FOR EACH STATEMENT EXECUTE FUNCTION gantry_credentials_changed();

CREATE TRIGGER workers_changed AFTER UPDATE ON workers
    FOR EACH ROW
    WHEN (OLD.token_hash IS DISTINCT FROM NEW.token_hash)
    EXECUTE FUNCTION gantry_credentials_changed();
