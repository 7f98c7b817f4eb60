package wire

// ProtocolVersion is the version this package speaks.
const ProtocolVersion uint32 = 2

// DefaultProfile is the profile a client names when the user named none.
const DefaultProfile = "default"

// ClientMessage is a frame a client sends: *Hello or *RequestFrame.
type ClientMessage interface {
	encodeClient(e *encoder)
}

// Hello is the first frame of every connection. Its first field is the
// protocol version in every version of the protocol.
type Hello struct {
	ProtocolVersion uint32
	ClientName      string
	ClientVersion   string
}

func (h *Hello) encodeClient(e *encoder) {
	e.u32(0)
	e.u32(h.ProtocolVersion)
	e.str(h.ClientName)
	e.str(h.ClientVersion)
}

// RequestFrame is a request with the id its answer will echo.
type RequestFrame struct {
	ID      uint64
	Request Request
}

func (r *RequestFrame) encodeClient(e *encoder) {
	e.u32(1)
	e.u64(r.ID)
	r.Request.encodeRequest(e)
}

// Request is one of the request types below (GetToken, Invalidate, ...).
type Request interface {
	encodeRequest(e *encoder)
}

// GetToken asks for a token valid for at least MinValidSecs more seconds (capped by the broker).
type GetToken struct {
	Profile      string
	MinValidSecs uint64
}

// Invalidate reports that the token of Generation was rejected by a server.
type Invalidate struct {
	Profile    string
	Generation uint64
}

// Watch subscribes to the profile's tokens and state changes.
type Watch struct{ Profile string }

// Status asks for broker figures and the first page of profiles.
type Status struct{}

// ImportRequest adds or replaces a profile from a token response obtained elsewhere.
type ImportRequest struct {
	Profile    string
	Issuer     string
	ClientID   string
	Credential ClientCredential
	// ClientAuth nil lets the broker choose from the server's metadata.
	ClientAuth *ClientAuthMethod
	Scopes     []string
	Endpoints  EndpointOverrides
	// TokenResponse is the RFC 6749 §5.1 JSON body, verbatim (a secret).
	TokenResponse string
}

// Logout revokes (when Revoke) and deletes a profile.
type Logout struct {
	Profile string
	Revoke  bool
}

// Refresh refreshes now, whatever the current token's validity.
type Refresh struct{ Profile string }

// Unlock unlocks a passphrase-protected store.
type Unlock struct{ Passphrase string }

// Lock forgets the broker's key and secrets.
type Lock struct{}

// Shutdown stops the broker.
type Shutdown struct{}

// Ping checks that the broker answers.
type Ping struct{}

// SetClientRequest replaces a profile's client credential and refreshes with it.
type SetClientRequest struct {
	Profile    string
	Credential ClientCredential
	// ClientAuth nil lets the broker choose from the server's metadata.
	ClientAuth *ClientAuthMethod
}

// StatusPage asks for the profiles whose names sort after After.
type StatusPage struct{ After string }

func (r *GetToken) encodeRequest(e *encoder) {
	e.u32(0)
	e.str(r.Profile)
	e.u64(r.MinValidSecs)
}

func (r *Invalidate) encodeRequest(e *encoder) {
	e.u32(1)
	e.str(r.Profile)
	e.u64(r.Generation)
}

func (r *Watch) encodeRequest(e *encoder) {
	e.u32(2)
	e.str(r.Profile)
}

func (r *Status) encodeRequest(e *encoder) { e.u32(3) }

func (r *ImportRequest) encodeRequest(e *encoder) {
	e.u32(4)
	e.str(r.Profile)
	e.str(r.Issuer)
	e.str(r.ClientID)
	r.Credential.encode(e)
	encodeOptAuth(e, r.ClientAuth)
	e.strs(r.Scopes)
	r.Endpoints.encode(e)
	e.str(r.TokenResponse)
}

func (r *Logout) encodeRequest(e *encoder) {
	e.u32(5)
	e.str(r.Profile)
	e.boolean(r.Revoke)
}

func (r *Refresh) encodeRequest(e *encoder) {
	e.u32(6)
	e.str(r.Profile)
}

func (r *Unlock) encodeRequest(e *encoder) {
	e.u32(7)
	e.str(r.Passphrase)
}

func (r *Lock) encodeRequest(e *encoder)     { e.u32(8) }
func (r *Shutdown) encodeRequest(e *encoder) { e.u32(9) }
func (r *Ping) encodeRequest(e *encoder)     { e.u32(10) }

func (r *SetClientRequest) encodeRequest(e *encoder) {
	e.u32(11)
	e.str(r.Profile)
	r.Credential.encode(e)
	encodeOptAuth(e, r.ClientAuth)
}

func (r *StatusPage) encodeRequest(e *encoder) {
	e.u32(12)
	e.str(r.After)
}

// CredentialKind says which ClientCredential variant a value is.
type CredentialKind uint32

// The ClientCredential variants, in wire order.
const (
	// CredentialNone is a public client.
	CredentialNone CredentialKind = iota
	// CredentialSecret is a client secret.
	CredentialSecret
	// CredentialPrivateKey is a PEM private key for private_key_jwt.
	CredentialPrivateKey
)

// ClientCredential is a client's credential; Value is empty for CredentialNone.
type ClientCredential struct {
	Kind  CredentialKind
	Value string
}

func (c *ClientCredential) encode(e *encoder) {
	e.u32(uint32(c.Kind))
	if c.Kind != CredentialNone {
		e.str(c.Value)
	}
}

func decodeCredential(d *decoder) ClientCredential {
	kind := CredentialKind(d.variant("ClientCredential", 3))
	if kind == CredentialNone {
		return ClientCredential{Kind: kind}
	}
	return ClientCredential{Kind: kind, Value: d.str("ClientCredential value")}
}

// ClientAuthMethod is how the broker authenticates a client at the IdP.
type ClientAuthMethod uint32

// The ClientAuthMethod variants, in wire order.
const (
	AuthNone ClientAuthMethod = iota
	AuthClientSecretBasic
	AuthClientSecretPost
	AuthPrivateKeyJWT
)

func encodeOptAuth(e *encoder, m *ClientAuthMethod) {
	if m == nil {
		e.u8(0)
		return
	}
	e.u8(1)
	e.u32(uint32(*m))
}

func decodeOptAuth(d *decoder) *ClientAuthMethod {
	if !d.tag("client_auth") {
		return nil
	}
	m := ClientAuthMethod(d.variant("ClientAuthMethod", 4))
	return &m
}

// EndpointOverrides replace or fill what discovery found.
type EndpointOverrides struct {
	Token               *string
	Revocation          *string
	DeviceAuthorization *string
}

func (o *EndpointOverrides) encode(e *encoder) {
	e.optStr(o.Token)
	e.optStr(o.Revocation)
	e.optStr(o.DeviceAuthorization)
}

// ServerMessage is a frame the broker sends: *Welcome, *ResponseFrame,
// *EventFrame or *ErrorFrame.
type ServerMessage interface {
	encodeServer(e *encoder)
}

// Welcome is the broker's answer to a compatible Hello.
type Welcome struct {
	ProtocolVersion uint32
	BrokerVersion   string
	PID             uint32
}

// ResponseFrame answers the request with the same ID: exactly one of
// Response and Err is set.
type ResponseFrame struct {
	ID       uint64
	Response Response
	Err      *BrokerError
}

// EventFrame is a pushed event for the Watch request whose id is ID.
type EventFrame struct {
	ID    uint64
	Event WatchEvent
}

// ErrorFrame is the connection-level error; the broker closes next.
type ErrorFrame struct{ Err *BrokerError }

func (w *Welcome) encodeServer(e *encoder) {
	e.u32(0)
	e.u32(w.ProtocolVersion)
	e.str(w.BrokerVersion)
	e.u32(w.PID)
}

func (r *ResponseFrame) encodeServer(e *encoder) {
	e.u32(1)
	e.u64(r.ID)
	if r.Err != nil {
		e.u32(1)
		r.Err.encode(e)
		return
	}
	e.u32(0)
	r.Response.encodeResponse(e)
}

func (f *EventFrame) encodeServer(e *encoder) {
	e.u32(2)
	e.u64(f.ID)
	f.Event.encodeEvent(e)
}

func (f *ErrorFrame) encodeServer(e *encoder) {
	e.u32(3)
	f.Err.encode(e)
}

// Response is a successful answer: *Token, *Watching, *StatusReport,
// *Imported, *LoggedOut, *Done or *Pong.
type Response interface {
	encodeResponse(e *encoder)
}

// Token is an access token as served to clients. Times are unix seconds.
type Token struct {
	AccessToken string
	TokenType   string
	ExpiresAt   uint64
	IssuedAt    uint64
	// Generation grows by one with every new token of the profile.
	Generation uint64
	Scopes     []string
}

// Watching acknowledges a Watch; events with its id follow.
type Watching struct{}

// Imported answers an Import with the new profile's status.
type Imported struct{ Profile ProfileStatus }

// LoggedOut answers a Logout.
type LoggedOut struct {
	// Revoked is true when the IdP confirmed revocation of the refresh token.
	Revoked bool
	// RevokeError says why revocation was skipped or failed.
	RevokeError *string
}

// Done answers Unlock, Lock and Shutdown.
type Done struct{}

// Pong answers Ping.
type Pong struct{}

func (t *Token) encodeResponse(e *encoder) {
	e.u32(0)
	t.encode(e)
}

func (t *Token) encode(e *encoder) {
	e.str(t.AccessToken)
	e.str(t.TokenType)
	e.u64(t.ExpiresAt)
	e.u64(t.IssuedAt)
	e.u64(t.Generation)
	e.strs(t.Scopes)
}

func decodeToken(d *decoder) *Token {
	return &Token{
		AccessToken: d.str("access_token"),
		TokenType:   d.str("token_type"),
		ExpiresAt:   d.u64("expires_at"),
		IssuedAt:    d.u64("issued_at"),
		Generation:  d.u64("generation"),
		Scopes:      d.strs("scopes"),
	}
}

func (*Watching) encodeResponse(e *encoder) { e.u32(1) }

func (s *StatusReport) encodeResponse(e *encoder) {
	e.u32(2)
	s.Broker.encode(e)
	e.u64(uint64(len(s.Profiles)))
	for i := range s.Profiles {
		s.Profiles[i].encode(e)
	}
	e.optStr(s.NextAfter)
}

func (i *Imported) encodeResponse(e *encoder) {
	e.u32(3)
	i.Profile.encode(e)
}

func (l *LoggedOut) encodeResponse(e *encoder) {
	e.u32(4)
	e.boolean(l.Revoked)
	e.optStr(l.RevokeError)
}

func (*Done) encodeResponse(e *encoder) { e.u32(5) }
func (*Pong) encodeResponse(e *encoder) { e.u32(6) }

// WatchEvent is a pushed event: *TokenEvent, *StateEvent, *ReauthEvent,
// *RemovedEvent or *ClientRejectedEvent.
type WatchEvent interface {
	// ProfileName is the profile the event is about.
	ProfileName() string
	encodeEvent(e *encoder)
}

// TokenEvent carries a new token.
type TokenEvent struct {
	Profile string
	Token   Token
}

// StateEvent reports a state change.
type StateEvent struct {
	Profile    string
	State      ProfileState
	Generation uint64
	ExpiresAt  *uint64
}

// ReauthEvent says the refresh token is dead; Message tells the user what to run.
type ReauthEvent struct {
	Profile string
	Message string
}

// RemovedEvent says the profile was logged out or deleted.
type RemovedEvent struct{ Profile string }

// ClientRejectedEvent says the IdP rejected the client (not the grant).
type ClientRejectedEvent struct {
	Profile string
	Message string
}

// ProfileName implements WatchEvent.
func (ev *TokenEvent) ProfileName() string { return ev.Profile }

// ProfileName implements WatchEvent.
func (ev *StateEvent) ProfileName() string { return ev.Profile }

// ProfileName implements WatchEvent.
func (ev *ReauthEvent) ProfileName() string { return ev.Profile }

// ProfileName implements WatchEvent.
func (ev *RemovedEvent) ProfileName() string { return ev.Profile }

// ProfileName implements WatchEvent.
func (ev *ClientRejectedEvent) ProfileName() string { return ev.Profile }

func (ev *TokenEvent) encodeEvent(e *encoder) {
	e.u32(0)
	e.str(ev.Profile)
	ev.Token.encode(e)
}

func (ev *StateEvent) encodeEvent(e *encoder) {
	e.u32(1)
	e.str(ev.Profile)
	e.u32(uint32(ev.State))
	e.u64(ev.Generation)
	e.optU64(ev.ExpiresAt)
}

func (ev *ReauthEvent) encodeEvent(e *encoder) {
	e.u32(2)
	e.str(ev.Profile)
	e.str(ev.Message)
}

func (ev *RemovedEvent) encodeEvent(e *encoder) {
	e.u32(3)
	e.str(ev.Profile)
}

func (ev *ClientRejectedEvent) encodeEvent(e *encoder) {
	e.u32(4)
	e.str(ev.Profile)
	e.str(ev.Message)
}

// ProfileState is the state of one profile's token engine.
type ProfileState uint32

// The ProfileState variants, in wire order.
const (
	StateValid ProfileState = iota
	StateRefreshing
	StateBackoff
	StateExpired
	StateReauthRequired
	StateLocked
	StateError
	StateClientRejected
)

var stateNames = [...]string{"valid", "refreshing", "backoff", "expired", "reauth_required", "locked", "error", "client_rejected"}

// String is the snake_case name used in status output.
func (s ProfileState) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "unknown"
}

// LifetimeSource says where an access token's lifetime came from.
type LifetimeSource uint32

// The LifetimeSource variants, in wire order.
const (
	LifetimeExpiresIn LifetimeSource = iota
	LifetimeJWTExp
	LifetimeDefault
)

// StatusReport answers Status and StatusPage.
type StatusReport struct {
	Broker   BrokerStatus
	Profiles []ProfileStatus
	// NextAfter is set when more profiles follow: ask StatusPage{After: *NextAfter}.
	NextAfter *string
}

// BrokerStatus holds broker-wide figures.
type BrokerStatus struct {
	Version           string
	PID               uint32
	UptimeSecs        uint64
	Socket            string
	StateDir          string
	Locked            bool
	Connections       uint64
	RejectedPeers     uint64
	HandshakeTimeouts uint64
}

func (b *BrokerStatus) encode(e *encoder) {
	e.str(b.Version)
	e.u32(b.PID)
	e.u64(b.UptimeSecs)
	e.str(b.Socket)
	e.str(b.StateDir)
	e.boolean(b.Locked)
	e.u64(b.Connections)
	e.u64(b.RejectedPeers)
	e.u64(b.HandshakeTimeouts)
}

func decodeBrokerStatus(d *decoder) BrokerStatus {
	return BrokerStatus{
		Version:           d.str("version"),
		PID:               d.u32("pid"),
		UptimeSecs:        d.u64("uptime_secs"),
		Socket:            d.str("socket"),
		StateDir:          d.str("state_dir"),
		Locked:            d.boolean("locked"),
		Connections:       d.u64("connections"),
		RejectedPeers:     d.u64("rejected_peers"),
		HandshakeTimeouts: d.u64("handshake_timeouts"),
	}
}

// ProfileStatus describes one profile. Times are unix seconds.
type ProfileStatus struct {
	Name                 string
	Issuer               string
	ClientID             string
	Subject              *string
	State                ProfileState
	AccessTokenExpiresAt *uint64
	Generation           uint64
	RefreshCount         uint64
	RefreshFailures      uint64
	LastRefreshAt        *uint64
	NextRefreshAt        *uint64
	LastError            *string
	LifetimeSource       *LifetimeSource
}

func (p *ProfileStatus) encode(e *encoder) {
	e.str(p.Name)
	e.str(p.Issuer)
	e.str(p.ClientID)
	e.optStr(p.Subject)
	e.u32(uint32(p.State))
	e.optU64(p.AccessTokenExpiresAt)
	e.u64(p.Generation)
	e.u64(p.RefreshCount)
	e.u64(p.RefreshFailures)
	e.optU64(p.LastRefreshAt)
	e.optU64(p.NextRefreshAt)
	e.optStr(p.LastError)
	if p.LifetimeSource == nil {
		e.u8(0)
	} else {
		e.u8(1)
		e.u32(uint32(*p.LifetimeSource))
	}
}

func decodeProfileStatus(d *decoder) ProfileStatus {
	p := ProfileStatus{
		Name:                 d.str("name"),
		Issuer:               d.str("issuer"),
		ClientID:             d.str("client_id"),
		Subject:              d.optStr("subject"),
		State:                ProfileState(d.variant("ProfileState", 8)),
		AccessTokenExpiresAt: d.optU64("access_token_expires_at"),
		Generation:           d.u64("generation"),
		RefreshCount:         d.u64("refresh_count"),
		RefreshFailures:      d.u64("refresh_failures"),
		LastRefreshAt:        d.optU64("last_refresh_at"),
		NextRefreshAt:        d.optU64("next_refresh_at"),
		LastError:            d.optStr("last_error"),
	}
	if d.tag("lifetime_source") {
		s := LifetimeSource(d.variant("LifetimeSource", 3))
		p.LifetimeSource = &s
	}
	return p
}

// ErrorKind is a BrokerError variant. The wire carries only this index;
// Code() is the stable number shown to humans and scripts.
type ErrorKind uint32

// The BrokerError variants, in wire order.
const (
	ErrReauthRequired ErrorKind = iota
	ErrUnknownProfile
	ErrIdpUnavailable
	ErrLocked
	ErrBadRequest
	ErrVersionMismatch
	ErrInternal
	ErrClientRejected
)

var errorNames = [...]string{"reauth_required", "unknown_profile", "idp_unavailable", "locked", "bad_request", "version_mismatch", "internal", "client_rejected"}

// BrokerError is an error the broker reports. Which fields are set depends on Kind:
// Profile and Message (ReauthRequired, ClientRejected), Profile (UnknownProfile),
// RetryAfterSecs and Detail (IdpUnavailable), Detail (BadRequest, Internal),
// Broker and Client (VersionMismatch).
type BrokerError struct {
	Kind           ErrorKind
	Profile        string
	Message        string
	Detail         string
	RetryAfterSecs uint64
	Broker         uint32
	Client         uint32
}

// Code is the stable error code (1-based; not on the wire).
func (b *BrokerError) Code() uint16 { return uint16(b.Kind) + 1 }

// Name is the stable snake_case name of the error kind.
func (b *BrokerError) Name() string {
	if int(b.Kind) < len(errorNames) {
		return errorNames[b.Kind]
	}
	return "unknown"
}

func (b *BrokerError) Error() string {
	switch b.Kind {
	case ErrReauthRequired, ErrClientRejected:
		return b.Message
	case ErrUnknownProfile:
		return "unknown profile `" + b.Profile + "`; list profiles with `broker-ctl status`"
	case ErrIdpUnavailable:
		return "identity provider unavailable (" + b.Detail + "); retrying in " + uitoa(b.RetryAfterSecs) + "s"
	case ErrLocked:
		return "broker is locked; run `broker-ctl unlock`"
	case ErrBadRequest:
		return "bad request: " + b.Detail
	case ErrVersionMismatch:
		return "protocol version mismatch: broker speaks " + uitoa(uint64(b.Broker)) + ", client speaks " + uitoa(uint64(b.Client)) + "; upgrade the older side"
	default:
		return "internal broker error: " + b.Detail
	}
}

func uitoa(v uint64) string {
	if v == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	for v > 0 {
		i--
		b[i] = byte('0' + v%10)
		v /= 10
	}
	return string(b[i:])
}

func (b *BrokerError) encode(e *encoder) {
	e.u32(uint32(b.Kind))
	switch b.Kind {
	case ErrReauthRequired, ErrClientRejected:
		e.str(b.Profile)
		e.str(b.Message)
	case ErrUnknownProfile:
		e.str(b.Profile)
	case ErrIdpUnavailable:
		e.u64(b.RetryAfterSecs)
		e.str(b.Detail)
	case ErrLocked:
	case ErrBadRequest, ErrInternal:
		e.str(b.Detail)
	case ErrVersionMismatch:
		e.u32(b.Broker)
		e.u32(b.Client)
	}
}

func decodeBrokerError(d *decoder) *BrokerError {
	b := &BrokerError{Kind: ErrorKind(d.variant("BrokerError", 8))}
	if d.err != nil {
		return b
	}
	switch b.Kind {
	case ErrReauthRequired, ErrClientRejected:
		b.Profile = d.str("profile")
		b.Message = d.str("message")
	case ErrUnknownProfile:
		b.Profile = d.str("profile")
	case ErrIdpUnavailable:
		b.RetryAfterSecs = d.u64("retry_after_secs")
		b.Detail = d.str("detail")
	case ErrLocked:
	case ErrBadRequest, ErrInternal:
		b.Detail = d.str("detail")
	case ErrVersionMismatch:
		b.Broker = d.u32("broker")
		b.Client = d.u32("client")
	}
	return b
}
