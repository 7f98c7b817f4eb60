module example.invalid/kontext-broker/client-go/xoauth2

go 1.19

require (
	example.invalid/kontext-broker/client-go v0.0.0
	golang.org/x/oauth2 v0.3.0
)

replace example.invalid/kontext-broker/client-go => ../
