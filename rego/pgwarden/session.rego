# The session rule, read by the gateway once per login (data.pgwarden.session): what it
# enforces on every session of the principal (settings upstream, rate limits). The row that
# governs the principal picks its entry of data.pgwarden.session_guards; groups grant, never
# restrict, so an ai-agent that is also an engineer is governed as an engineer.
package pgwarden

default session := {}

session := data.pgwarden.session_guards[role]
