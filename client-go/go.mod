module example.invalid/kontext-broker/client-go

go 1.19
