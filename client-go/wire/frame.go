package wire

import (
	"encoding/binary"
	"fmt"
	"io"
)

// FrameTooLargeError is a length prefix above MaxFrameLen.
type FrameTooLargeError struct{ Len uint32 }

func (e *FrameTooLargeError) Error() string {
	return fmt.Sprintf("frame of %d bytes exceeds the %d byte limit", e.Len, MaxFrameLen)
}

func frame(encode func(*encoder)) ([]byte, error) {
	e := encoder{buf: make([]byte, 4, 64)}
	encode(&e)
	n := len(e.buf) - 4
	if n > MaxFrameLen {
		return nil, ErrTooLarge
	}
	binary.BigEndian.PutUint32(e.buf[:4], uint32(n))
	return e.buf, nil
}

// EncodeClientFrame encodes m as one complete frame: length prefix and payload.
func EncodeClientFrame(m ClientMessage) ([]byte, error) {
	return frame(m.encodeClient)
}

// EncodeServerFrame encodes m as one complete frame: length prefix and payload.
func EncodeServerFrame(m ServerMessage) ([]byte, error) {
	return frame(m.encodeServer)
}

// ReadFrame reads one frame from r and returns its payload. A length prefix
// above MaxFrameLen is refused before the body is read. io.EOF means the
// stream ended cleanly between frames; io.ErrUnexpectedEOF, inside one.
func ReadFrame(r io.Reader) ([]byte, error) {
	var head [4]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(head[:])
	if n > MaxFrameLen {
		return nil, &FrameTooLargeError{Len: n}
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return payload, nil
}

// DecodeServer decodes one ServerMessage payload (no length prefix).
func DecodeServer(payload []byte) (ServerMessage, error) {
	d := decoder{buf: payload}
	var m ServerMessage
	switch d.variant("ServerMessage", 4) {
	case 0:
		m = &Welcome{
			ProtocolVersion: d.u32("protocol_version"),
			BrokerVersion:   d.str("broker_version"),
			PID:             d.u32("pid"),
		}
	case 1:
		f := &ResponseFrame{ID: d.u64("id")}
		if d.variant("Result", 2) == 1 {
			f.Err = decodeBrokerError(&d)
		} else {
			f.Response = decodeResponse(&d)
		}
		m = f
	case 2:
		m = &EventFrame{ID: d.u64("id"), Event: decodeEvent(&d)}
	case 3:
		m = &ErrorFrame{Err: decodeBrokerError(&d)}
	}
	if err := d.finish(); err != nil {
		return nil, err
	}
	return m, nil
}

func decodeResponse(d *decoder) Response {
	switch d.variant("Response", 7) {
	case 0:
		return decodeToken(d)
	case 1:
		return &Watching{}
	case 2:
		s := &StatusReport{Broker: decodeBrokerStatus(d)}
		n := d.u64("profiles")
		// A profile takes at least 58 bytes: bound the count before allocating.
		if d.err == nil && n > uint64(len(d.buf))/58 {
			d.fail("profiles: %d elements cannot fit in %d bytes", n, len(d.buf))
			return s
		}
		s.Profiles = make([]ProfileStatus, 0, n)
		for i := uint64(0); i < n && d.err == nil; i++ {
			s.Profiles = append(s.Profiles, decodeProfileStatus(d))
		}
		s.NextAfter = d.optStr("next_after")
		return s
	case 3:
		return &Imported{Profile: decodeProfileStatus(d)}
	case 4:
		return &LoggedOut{Revoked: d.boolean("revoked"), RevokeError: d.optStr("revoke_error")}
	case 5:
		return &Done{}
	case 6:
		return &Pong{}
	}
	return nil
}

func decodeEvent(d *decoder) WatchEvent {
	switch d.variant("WatchEvent", 5) {
	case 0:
		profile := d.str("profile")
		return &TokenEvent{Profile: profile, Token: *decodeToken(d)}
	case 1:
		return &StateEvent{
			Profile:    d.str("profile"),
			State:      ProfileState(d.variant("ProfileState", 8)),
			Generation: d.u64("generation"),
			ExpiresAt:  d.optU64("expires_at"),
		}
	case 2:
		return &ReauthEvent{Profile: d.str("profile"), Message: d.str("message")}
	case 3:
		return &RemovedEvent{Profile: d.str("profile")}
	case 4:
		return &ClientRejectedEvent{Profile: d.str("profile"), Message: d.str("message")}
	}
	return nil
}

// DecodeClient decodes one ClientMessage payload (no length prefix).
func DecodeClient(payload []byte) (ClientMessage, error) {
	d := decoder{buf: payload}
	var m ClientMessage
	switch d.variant("ClientMessage", 2) {
	case 0:
		m = &Hello{
			ProtocolVersion: d.u32("protocol_version"),
			ClientName:      d.str("client_name"),
			ClientVersion:   d.str("client_version"),
		}
	case 1:
		m = &RequestFrame{ID: d.u64("id"), Request: decodeRequest(&d)}
	}
	if err := d.finish(); err != nil {
		return nil, err
	}
	return m, nil
}

func decodeRequest(d *decoder) Request {
	switch d.variant("Request", 13) {
	case 0:
		return &GetToken{Profile: d.str("profile"), MinValidSecs: d.u64("min_valid_secs")}
	case 1:
		return &Invalidate{Profile: d.str("profile"), Generation: d.u64("generation")}
	case 2:
		return &Watch{Profile: d.str("profile")}
	case 3:
		return &Status{}
	case 4:
		r := &ImportRequest{
			Profile:  d.str("profile"),
			Issuer:   d.str("issuer"),
			ClientID: d.str("client_id"),
		}
		r.Credential = decodeCredential(d)
		r.ClientAuth = decodeOptAuth(d)
		r.Scopes = d.strs("scopes")
		r.Endpoints = EndpointOverrides{
			Token:               d.optStr("token endpoint"),
			Revocation:          d.optStr("revocation endpoint"),
			DeviceAuthorization: d.optStr("device_authorization endpoint"),
		}
		r.TokenResponse = d.str("token_response")
		return r
	case 5:
		return &Logout{Profile: d.str("profile"), Revoke: d.boolean("revoke")}
	case 6:
		return &Refresh{Profile: d.str("profile")}
	case 7:
		return &Unlock{Passphrase: d.str("passphrase")}
	case 8:
		return &Lock{}
	case 9:
		return &Shutdown{}
	case 10:
		return &Ping{}
	case 11:
		r := &SetClientRequest{Profile: d.str("profile")}
		r.Credential = decodeCredential(d)
		r.ClientAuth = decodeOptAuth(d)
		return r
	case 12:
		return &StatusPage{After: d.str("after")}
	}
	return nil
}
