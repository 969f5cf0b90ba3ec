// Package vhostuser is the backend side of the vhost-user protocol
// (QEMU docs/interop/vhost-user.rst): the unix socket, the message codec with
// its file descriptors, the guest memory table and the vring setup. Device
// semantics (virtio-blk) live behind the Device interface.
package vhostuser

import "fmt"

// Request is a front-end message type.
type Request uint32

// Front-end message types (vhost-user.rst, "Front-end message types").
const (
	GetFeatures         Request = 1
	SetFeatures         Request = 2
	SetOwner            Request = 3
	ResetOwner          Request = 4
	SetMemTable         Request = 5
	SetLogBase          Request = 6
	SetLogFd            Request = 7
	SetVringNum         Request = 8
	SetVringAddr        Request = 9
	SetVringBase        Request = 10
	GetVringBase        Request = 11
	SetVringKick        Request = 12
	SetVringCall        Request = 13
	SetVringErr         Request = 14
	GetProtocolFeatures Request = 15
	SetProtocolFeatures Request = 16
	GetQueueNum         Request = 17
	SetVringEnable      Request = 18
	SendRarp            Request = 19
	NetSetMtu           Request = 20
	SetBackendReqFd     Request = 21
	IotlbMsg            Request = 22
	SetVringEndian      Request = 23
	GetConfig           Request = 24
	SetConfig           Request = 25
	GetInflightFd       Request = 31
	SetInflightFd       Request = 32
	ResetDevice         Request = 34
	VringKick           Request = 35
	GetMaxMemSlots      Request = 36
	AddMemReg           Request = 37
	RemMemReg           Request = 38
	SetStatus           Request = 39
	GetStatus           Request = 40
)

var requestNames = map[Request]string{
	GetFeatures: "GET_FEATURES", SetFeatures: "SET_FEATURES", SetOwner: "SET_OWNER",
	ResetOwner: "RESET_OWNER", SetMemTable: "SET_MEM_TABLE", SetLogBase: "SET_LOG_BASE",
	SetLogFd: "SET_LOG_FD", SetVringNum: "SET_VRING_NUM", SetVringAddr: "SET_VRING_ADDR",
	SetVringBase: "SET_VRING_BASE", GetVringBase: "GET_VRING_BASE", SetVringKick: "SET_VRING_KICK",
	SetVringCall: "SET_VRING_CALL", SetVringErr: "SET_VRING_ERR",
	GetProtocolFeatures: "GET_PROTOCOL_FEATURES", SetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	GetQueueNum: "GET_QUEUE_NUM", SetVringEnable: "SET_VRING_ENABLE", SendRarp: "SEND_RARP",
	NetSetMtu: "NET_SET_MTU", SetBackendReqFd: "SET_BACKEND_REQ_FD", IotlbMsg: "IOTLB_MSG",
	SetVringEndian: "SET_VRING_ENDIAN", GetConfig: "GET_CONFIG", SetConfig: "SET_CONFIG",
	GetInflightFd: "GET_INFLIGHT_FD", SetInflightFd: "SET_INFLIGHT_FD", ResetDevice: "RESET_DEVICE",
	VringKick: "VRING_KICK", GetMaxMemSlots: "GET_MAX_MEM_SLOTS", AddMemReg: "ADD_MEM_REG",
	RemMemReg: "REM_MEM_REG", SetStatus: "SET_STATUS", GetStatus: "GET_STATUS",
}

func (r Request) String() string {
	if n, ok := requestNames[r]; ok {
		return n
	}
	return fmt.Sprintf("REQUEST_%d", uint32(r))
}

// Header flags.
const (
	flagVersion   = 0x1    // the protocol version, in bits 0-1
	flagVersionMk = 0x3    // version mask
	flagReply     = 1 << 2 // this message is a reply
	flagNeedReply = 1 << 3 // the front-end wants a REPLY_ACK
)

// Feature bits of the vhost-user layer itself.
const (
	// FProtocolFeatures is VHOST_USER_F_PROTOCOL_FEATURES.
	FProtocolFeatures = 30
)

// Protocol feature bits.
const (
	ProtocolFMQ                = 0
	ProtocolFLogShmfd          = 1
	ProtocolFReplyAck          = 3
	ProtocolFBackendReq        = 5
	ProtocolFConfig            = 9
	ProtocolFInflightShmfd     = 12
	ProtocolFResetDevice       = 13
	ProtocolFConfigureMemSlots = 15
)

// offeredProtocolFeatures are the protocol features this backend implements.
const offeredProtocolFeatures = 1<<ProtocolFMQ | 1<<ProtocolFLogShmfd | 1<<ProtocolFReplyAck | 1<<ProtocolFConfig |
	1<<ProtocolFResetDevice | 1<<ProtocolFConfigureMemSlots | 1<<ProtocolFBackendReq | 1<<ProtocolFInflightShmfd

// Limits.
const (
	headerSize = 12
	// maxPayload bounds a message body; the largest legitimate one is a
	// config message (12 + 256 bytes).
	maxPayload = 4096
	// maxFds is how many descriptors one message may carry.
	maxFds = 8
	// maxMemTableRegions is VHOST_MEMORY_BASELINE_NREGIONS.
	maxMemTableRegions = 8
	// maxMemSlots is our answer to GET_MAX_MEM_SLOTS.
	maxMemSlots = 32
	// maxConfigSize is VHOST_USER_MAX_CONFIG_SIZE.
	maxConfigSize = 256
	// vringIdxMask and vringNoFdMask split a SET_VRING_{KICK,CALL,ERR} u64.
	vringIdxMask  = 0xff
	vringNoFdMask = 1 << 8
)
