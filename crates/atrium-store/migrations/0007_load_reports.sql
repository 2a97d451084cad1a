-- The gateways' latest load reports (per deployment: in flight, started,
-- held), kept where every server sees them: a gateway reports to any
-- server, and the autoscaler runs on the one that leads. Overwritten each
-- second; not part of the change log.
CREATE TABLE load_reports (
    gateway TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
