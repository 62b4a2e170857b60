"""The privacy promises that are code: worker hardening (no core dumps), account deletion and purge, the GDPR
data export, and the retention job that anonymizes old usage."""
